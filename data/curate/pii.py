"""Stage 7, PII scrubbing: typed placeholders for e-mail addresses, public IP
addresses, phone numbers, payment card numbers and US social security numbers.

Regexes find candidates; each type then has a check that a regex cannot make:
  email  local@domain.tld, the top-level domain alphabetic;
  ip     IPv4 or IPv6 that Python's `ipaddress` accepts and calls global (not
         private, loopback, link-local, documentation, ...); an IPv6 must also
         be global unicast (2000::/3). Dotted runs of more than four numbers
         (version strings like 1.2.3.4.5) are not addresses;
  card   13 to 19 digits (single spaces or hyphens between groups allowed),
         a known issuer prefix and a valid Luhn checksum;
  ssn    AAA-GG-SSSS with the SSA's never-issued ranges excluded (area 000,
         666 or 9xx, group 00, serial 0000);
  phone  North American numbers with separators ((415) 555-2671,
         415-555-2671, +1 415 555 2671) and international numbers written with
         a leading + and 8 to 15 digits in groups (+44 20 7946 0958).
Where matches overlap, the earlier type in that list wins (a card number
contains many phone-shaped runs).
"""

import dataclasses
import ipaddress
import re
from collections.abc import Sequence

TYPES = ('email', 'ip', 'card', 'ssn', 'phone')
PLACEHOLDERS = {'email': '<EMAIL_ADDRESS>', 'ip': '<IP_ADDRESS>', 'card': '<CARD_NUMBER>',
                'ssn': '<US_SSN>', 'phone': '<PHONE_NUMBER>'}

_EMAIL = re.compile(r'(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@'
                    r'(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])')
# Not preceded or followed by another dotted number (version strings), nor by a word character.
_IPV4 = re.compile(r'(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)')
_IPV6 = re.compile(r'(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|'
                   r'(?:\d{1,3}\.){3}\d{1,3})(?![\w:.])')
_CARD = re.compile(r'(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])')
_SSN = re.compile(r'(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])')
_PHONE = re.compile(
    r'(?<![\w+-])(?:'
    r'(?:\+?1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}'  # North America
    r'|\+\d{1,3}(?:[ .-]\(?\d{1,5}\)?){2,6}'  # international, + and groups
    r')(?![\w-])')
_CARD_PREFIXES = re.compile(
    r'4|5[1-5]|222[1-9]|22[3-9]\d|2[3-6]\d\d|27[01]\d|2720|3[47]|30[0-5]|36|38|6011|64[4-9]|65|'
    r'35(?:2[89]|[3-8]\d)|62')


@dataclasses.dataclass(frozen=True)
class Match:
  start: int
  end: int
  kind: str


def luhn_valid(digits: str) -> bool:
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = int(ch)
    if i % 2 == 1:
      d = d * 2 - 9 if d > 4 else d * 2
    total += d
  return total % 10 == 0


def _is_public_ip(text: str) -> bool:
  try:
    address = ipaddress.ip_address(text)
  except ValueError:
    return False
  if address.version == 6:
    if address.ipv4_mapped is not None:
      return address.ipv4_mapped.is_global
    return address.is_global and address in _GLOBAL_UNICAST
  return address.is_global


_GLOBAL_UNICAST = ipaddress.ip_network('2000::/3')


def _card_ok(text: str) -> bool:
  digits = re.sub(r'[ -]', '', text)
  return (13 <= len(digits) <= 19 and _CARD_PREFIXES.match(digits) is not None
          and luhn_valid(digits))


def _ssn_ok(m: re.Match) -> bool:
  area, group, serial = m.group(1), m.group(2), m.group(3)
  return area not in ('000', '666') and area[0] != '9' and group != '00' and serial != '0000'


def _phone_ok(text: str) -> bool:
  digits = sum(c.isdigit() for c in text)
  return 10 <= digits <= 15 if not text.startswith('+') else 8 <= digits <= 15


def find(text: str, types: Sequence[str] = TYPES) -> list[Match]:
  """The non-overlapping PII spans of `text`, in order, of the given types."""
  found: list[Match] = []
  for kind in TYPES:
    if kind not in types:
      continue
    for m in _candidates(text, kind):
      if not any(m.start < f.end and f.start < m.end for f in found):
        found.append(m)
  return sorted(found, key=lambda m: m.start)


def _candidates(text: str, kind: str):
  if kind == 'email':
    if '@' in text:
      yield from (Match(m.start(), m.end(), kind) for m in _EMAIL.finditer(text))
  elif kind == 'ip':
    for pattern in (_IPV6, _IPV4):  # v6 first: it may end in a dotted v4
      for m in pattern.finditer(text):
        if _is_public_ip(m.group()):
          yield Match(m.start(), m.end(), kind)
  elif kind == 'card':
    yield from (Match(m.start(), m.end(), kind) for m in _CARD.finditer(text)
                if _card_ok(m.group()))
  elif kind == 'ssn':
    yield from (Match(m.start(), m.end(), kind) for m in _SSN.finditer(text) if _ssn_ok(m))
  elif kind == 'phone':
    yield from (Match(m.start(), m.end(), kind) for m in _PHONE.finditer(text)
                if _phone_ok(m.group()))
  else:
    raise ValueError(f'Unknown PII type {kind!r}; choose from {", ".join(TYPES)}.')


def scrub(text: str, types: Sequence[str] = TYPES) -> tuple[str, list[Match]]:
  """`text` with each PII span replaced by its type's placeholder, and the spans."""
  matches = find(text, types)
  pieces, last = [], 0
  for m in matches:
    pieces += [text[last:m.start], PLACEHOLDERS[m.kind]]
    last = m.end
  pieces.append(text[last:])
  return ''.join(pieces), matches
