"""Curation rules on crafted documents that just pass and just fail each threshold.

Oracles are counts made by construction: a document built with exactly k
repeated lines out of n, or words of known lengths, has a fraction we know
without running the rule. Thresholds are the published defaults of
configs/curate.py; where rules of one family interact (repeated lines are
also repeated n-grams), the others are opened wide so that the one under
test decides.
"""

import math

import pytest

from configs import curate
from data.curate import normalize, pii, quality, stages, toxicity
from data.errors import DataError

CFG = curate.get_config()


def cfg_of(family: str, **overrides):
  cfg = CFG[family].copy_and_resolve_references()
  cfg.update(overrides)
  return cfg


def english(n: int) -> str:
  """n whitespace-separated words of 3 to 6 letters, with the stop words 'the' and 'and'."""
  base = 'the cat and dog ran over wide green fields'.split()
  return ' '.join(base[i % len(base)] for i in range(n))


def distinct_words(n: int, length: int = 4, prefix: str = 'w') -> list[str]:
  """n distinct words of exactly `length` characters."""
  return [f'{prefix}{i:0{length - len(prefix)}d}' for i in range(n)]


# --- normalisation --------------------------------------------------------------------


def test_normalize_nfc_controls_whitespace():
  n = normalize.Normalizer(CFG.normalize)
  assert n('cafe\u0301') == 'caf\u00e9'  # NFC composes e + combining acute
  assert n('a\x00b\x07c\u200b\ufeffd') == 'abc\u200bd'  # C0 controls and BOM go; ZWSP stays
  assert n('one\r\ntwo\rthree\u2028four') == 'one\ntwo\nthree\nfour'
  assert n('a\u00a0b\u3000c   \n') == 'a b c'
  assert n('x\n\n\n\n\n\ny') == 'x\n\n\ny'  # at most two blank lines
  assert n('def f():\n    return 1\n') == 'def f():\n    return 1'  # indentation kept
  assert n('\ud800lone') == 'lone'  # a lone surrogate (possible from JSON) goes
  off = normalize.Normalizer(cfg_of('normalize', nfc=False, control_chars=False,
                                    whitespace=False))
  assert off('cafe\u0301\x00 ') == 'cafe\u0301\x00 '
  verdict = stages.Normalize(CFG.normalize).process(
      {'id': ('f', 1), 'text': ' \x00\n ', 'metadata': {}})
  assert verdict.doc is None and verdict.reason == 'empty after normalisation'


# --- Gopher quality -------------------------------------------------------------------

Q = CFG.gopher_quality


def gq(text, **overrides):
  return quality.gopher_quality(text, cfg_of('gopher_quality', **overrides))


def test_gopher_word_count_bounds():
  assert gq(english(50)) is None
  assert gq(english(49)) == 'fewer than 50 words'
  assert gq(english(100_000)) is None
  assert gq(english(100_001)) == 'more than 100000 words'


def test_gopher_mean_word_length_bounds():
  low = ['the', 'and'] + ['cat'] * 48  # mean exactly 3.0
  assert gq(' '.join(low)) is None
  assert gq(' '.join(low[:-1] + ['at'])).startswith('mean word length')  # 149/50 < 3
  # 2 words of 3 + 46 of 10 + 2 of 17 = 500 characters in 50 words: mean exactly 10.
  high = ['the', 'and'] + ['abcdefghij'] * 46 + ['abcdefghijklmnopq'] * 2
  assert gq(' '.join(high)) is None
  assert gq(' '.join(high[:-1] + ['abcdefghijklmnopqr'])).startswith('mean word length')


@pytest.mark.parametrize('symbol', ['#', '...', '…'])
def test_gopher_symbol_to_word_ratio(symbol):
  def doc(k):  # 50 words, k of them carrying the symbol: ratio k / 50
    words = english(50).split()
    return ' '.join(w + symbol if 10 <= i < 10 + k else w for i, w in enumerate(words))
  assert gq(doc(5)) is None  # 0.1 is not above 0.1
  assert 'ratio above 0.1' in gq(doc(6))


def test_gopher_bullet_and_ellipsis_lines():
  line = 'the green fields and the yellow flowers'  # long words: a bullet keeps the mean above 3
  def bullets(k):  # 10 lines, k starting with a bullet
    return '\n'.join(('- ' if i < k else '') + line for i in range(10))
  assert gq(bullets(9)) is None
  assert gq(bullets(10)) == 'more than 90% of lines start with a bullet'
  def ellipses(k):  # 10 lines, k ending in an ellipsis (4 / 60 words is under the symbol ratio)
    return '\n'.join(line + ('...' if i < k else '.') for i in range(10))
  assert gq(ellipses(3)) is None
  assert gq(ellipses(4)) == 'more than 30% of lines end with an ellipsis'


def test_gopher_alphabetic_words_and_stop_words():
  def doc(k):  # 50 words, k without a letter
    words = english(50).split()
    return ' '.join('123' if 20 <= i < 20 + k else w for i, w in enumerate(words))
  assert gq(doc(10)) is None  # 40 / 50 = 80% have a letter
  assert gq(doc(11)) == 'fewer than 80% of words have a letter'
  one_stop_word = ' '.join(['the'] + ['cat'] * 49)
  assert gq(one_stop_word) == 'fewer than 2 distinct stop words'
  assert gq(one_stop_word + ' with') is None


# --- Gopher repetition ----------------------------------------------------------------

# Every repetition limit wide open; a test narrows the one it checks to its default.
OPEN = dict(max_dup_line_frac=1.0, max_dup_paragraph_frac=1.0, max_dup_line_char_frac=1.0,
            max_dup_paragraph_char_frac=1.0, max_top_ngram_char_frac=(1.0, 1.0, 1.0),
            max_dup_ngram_char_frac=(1.0,) * 6)


def rep(text, **only):
  return quality.gopher_repetition(text, cfg_of('gopher_repetition', **{**OPEN, **only}))


def test_gopher_repeated_line_and_paragraph_fractions():
  lines = [' '.join(distinct_words(5, prefix=f'l{i}')) for i in range(10)]
  def doc(k, sep):  # 10 parts, the last k repeating earlier ones
    return sep.join(lines[:10 - k] + lines[:k])
  for unit, sep in (('line', '\n'), ('paragraph', '\n\n')):
    limit = {f'max_dup_{unit}_frac': CFG.gopher_repetition[f'max_dup_{unit}_frac']}
    assert rep(doc(3, sep), **limit) is None  # 3 / 10 is not above 30%
    assert rep(doc(4, sep), **limit) == f'more than 30% of {unit}s repeated'


def test_gopher_repeated_characters_in_lines_and_paragraphs():
  # Parts A, B, A: the repeat is a / len(text) of the characters.
  a = 'x' * 10
  for unit, sep in (('line', '\n'), ('paragraph', '\n\n')):
    limit = {f'max_dup_{unit}_char_frac': 0.2}
    b_len = 3 * len(a) - 2 * len(sep)  # makes len(text) = 5 * len(a): exactly 20%
    assert rep(sep.join([a, 'y' * b_len, a]), **limit) is None
    assert rep(sep.join([a, 'y' * (b_len - 1), a]), **limit) == \
        f'more than 20% of characters in repeated {unit}s'


def ngram_doc(n: int, total_words: int) -> str:
  """Words of 4 letters, one n-gram occurring twice and no other repeated n-gram."""
  words = distinct_words(total_words - 2 * n)
  gram = distinct_words(n, prefix='g')
  return ' '.join(gram + words + gram)


@pytest.mark.parametrize('index', range(3))
def test_gopher_top_ngram_fraction(index):
  n = CFG.gopher_repetition.top_ngram_sizes[index]
  limit = CFG.gopher_repetition.max_top_ngram_char_frac[index]
  # The top n-gram, twice, covers 2n of the words, all of equal length: 2n / W.
  passing = math.ceil(2 * n / limit - 1e-9)
  limits = list(OPEN['max_top_ngram_char_frac'])
  limits[index] = limit
  assert rep(ngram_doc(n, passing), max_top_ngram_char_frac=tuple(limits)) is None
  assert rep(ngram_doc(n, passing - 1), max_top_ngram_char_frac=tuple(limits)) == \
      f'most frequent {n}-gram covers more than {limit:.0%} of characters'


@pytest.mark.parametrize('index', range(6))
def test_gopher_duplicate_ngram_fraction(index):
  n = CFG.gopher_repetition.dup_ngram_sizes[index]
  limit = CFG.gopher_repetition.max_dup_ngram_char_frac[index]
  passing = math.ceil(2 * n / limit - 1e-9)  # both copies of the n-gram: 2n of W words
  limits = list(OPEN['max_dup_ngram_char_frac'])
  limits[index] = limit
  assert rep(ngram_doc(n, passing), max_dup_ngram_char_frac=tuple(limits)) is None
  assert rep(ngram_doc(n, passing - 1), max_dup_ngram_char_frac=tuple(limits)) == \
      f'repeated {n}-grams cover more than {limit:.0%} of characters'


def test_gopher_duplicate_ngram_overlaps_count_once():
  # 'a b c d e f' twice: with n=5, positions 0-1 and 6-7 start repeated 5-grams,
  # covering all 12 words once each, not 20 words.
  import numpy as np

  from data.curate import words
  hashes, lengths = words.words('a b c d e f a b c d e f')
  assert quality.dup_ngram_char_frac(hashes, lengths, 5) == 1.0
  hashes, lengths = words.words('a b c d e f a b c d e g')
  covered = np.array([1] * 5 + [0] + [1] * 5 + [0])  # 'a..e' twice; f and g once
  assert quality.dup_ngram_char_frac(hashes, lengths, 5) == covered.mean()


# --- C4 ---------------------------------------------------------------------------------


def c4(text, **overrides):
  return quality.c4(text, cfg_of('c4', **overrides))


def test_c4_line_rules():
  good = ['The first line has enough words.', 'A second line also has words!',
          'Does a third line end right?']
  assert c4('\n'.join(good)) == ('\n'.join(good), None)
  assert c4('\n'.join(good + ['Four words only here.']))[0] == '\n'.join(good)
  assert c4('\n'.join(good + ['Five words are here now.']))[0] == '\n'.join(
      good + ['Five words are here now.'])
  for dropped in ('This line has no terminal mark', 'This line trails off with dots...',
                  'Please enable Javascript to see this page.',
                  'Read our privacy policy before you go.'):
    assert c4('\n'.join(good + [dropped]))[0] == '\n'.join(good), dropped
  assert c4('\n'.join(good + ['A claim with a citation here.[12]']))[0] == '\n'.join(
      good + ['A claim with a citation here.'])
  long_word = 'x' * 1000
  assert c4('\n'.join(good + [f'One long {long_word} word is fine.']))[0].endswith('fine.')
  assert c4('\n'.join(good + [f'One long {long_word}y word is not.']))[0] == '\n'.join(good)


def test_c4_page_rules():
  two = 'The first line has enough words.\nA second line also has words.'
  assert c4(two) == (None, 'fewer than 3 sentences in kept lines')
  assert c4(two + ' And a third one.')[1] is None  # sentences, not lines, are counted
  three = two + '\nA third line with words here.'
  assert c4(three + '\nLorem ipsum dolor sit amet, consectetur.') == (None, 'lorem ipsum')
  assert c4(three + '\nThe dict {a: 1} has one key here.') == (None, 'curly bracket')
  assert c4(three + '\nThe dict {a: 1} has one key here.', filter_curly_bracket=False)[1] is None


# --- FineWeb ----------------------------------------------------------------------------


def test_fineweb_punctuation_short_lines_and_duplicates():
  long_line = 'this line is comfortably longer than thirty characters'
  def punct(k):  # 100 distinct long lines, k ending in a period
    return '\n'.join(f'{long_line} {i}' + ('.' if i < k else '') for i in range(100))
  fw = lambda text: quality.fineweb(text, CFG.fineweb)  # noqa: E731
  assert fw(punct(13)) is None
  assert fw(punct(12)) == 'at most 12% of lines end in punctuation'
  def short(k):  # 100 distinct lines ending in '.', k of them shorter than 30 characters
    return '\n'.join((f'short {i}.' if i < k else f'{long_line} {i}.') for i in range(100))
  assert fw(short(66)) is None
  assert fw(short(67)) == 'at least 67% of lines are shorter than 30 characters'
  # Lines of 40 characters; the copies' share of all line characters.
  lines = [f'{i:02d} ' + 'x' * 36 + '.' for i in range(20)]
  assert fw('\n'.join(lines[:18] + lines[:2])) == \
      'at least 10% of characters in repeated lines'  # 80 of 800 characters
  assert fw('\n'.join(lines + lines[:2])) is None  # 80 of 880: 9.1%


# --- toxicity ---------------------------------------------------------------------------


def test_toxicity_word_list_whole_words_and_max_hits(tmp_path):
  entries = toxicity.read_word_list(CFG.toxicity.word_list)
  assert 'porn' in entries and 'kill yourself' in entries and len(entries) < 100
  f = toxicity.WordListFilter(entries)
  assert f.hits('Porn here.') == 1  # case-insensitive
  assert f.hits('pornographic scunthorpe Dickens cocktail') == 0  # whole words only
  assert f.hits('just KILL\n  yourself') == 1  # a phrase across whitespace
  assert toxicity.WordListFilter(['a$$']).hits('what a$$ and a$$x') == 1  # not only \w entries
  stage = stages.Toxicity(cfg_of('toxicity', max_hits=1))
  stage.setup()
  doc = lambda t: {'id': ('f', 1), 'text': t, 'metadata': {}}  # noqa: E731
  assert stage.process_batch([doc('one porn word')])[0].doc is not None
  assert stage.process_batch([doc('porn and more porn')])[0].reason == 'more than 1 listed words'
  empty = tmp_path / 'empty.txt'
  empty.write_text('# only a comment\n')
  with pytest.raises(DataError, match='has no entries'):
    toxicity.read_word_list(str(empty))
  with pytest.raises(DataError, match='Cannot read the toxicity word list'):
    toxicity.read_word_list(str(tmp_path / 'missing.txt'))


def keyword_classifier(texts):
  """A stand-in classifier for the hook: 0.9 for texts that mention 'awful', else 0.1."""
  return [0.9 if 'awful' in t else 0.1 for t in texts]


def test_toxicity_classifier_hook():
  stage = stages.Toxicity(cfg_of('toxicity', classifier='test_curate_rules:keyword_classifier',
                                 classifier_batch_size=4))
  assert stage.batch_size == 4
  stage.setup()
  docs = [{'id': ('f', i), 'text': t, 'metadata': {}}
          for i, t in enumerate(['a fine day', 'an awful day'])]
  verdicts = stage.process_batch(docs)
  assert verdicts[0].doc is docs[0]
  assert verdicts[1].reason == 'classifier score at least 0.5'
  with pytest.raises(DataError, match="must be 'module:function'"):
    toxicity.load_classifier('no_colon')
  with pytest.raises(DataError, match='Cannot load'):
    toxicity.load_classifier('test_curate_rules:missing')


# --- PII ----------------------------------------------------------------------------------

PII_CASES = {
    'email': (['jane.doe@example.com', 'a_b+tag@mail.co.uk'],
              ['@property', 'user@localhost', 'name @ example.com']),
    'ip': (['8.8.8.8', '2001:4860:4860::8888', '::ffff:8.8.4.4'],
           ['192.168.1.1', '10.0.0.7', '127.0.0.1', '1.2.3.4.5', '256.1.1.1', '3.11.7',
            'fe80::1', '::1', '2001:db8::1', 'std::vector', '12:30:45']),
    'card': (['4111 1111 1111 1111', '5500-0000-0000-0004', '378282246310005'],
             ['4111 1111 1111 1112', '1234567812345678', '4111 1111 1111']),
    'ssn': (['123-45-6789'], ['000-12-3456', '666-12-3456', '900-12-3456', '123-00-4567',
                              '123-45-0000', '123456789']),
    'phone': (['(415) 555-2671', '415-555-2671', '+1 415 555 2671', '+44 20 7946 0958'],
              ['2021-05-12', '978-3-16-148410-0', '1234567890', 'version 3.11.7', '555-2671']),
}


@pytest.mark.parametrize('kind', pii.TYPES)
def test_pii_positive_and_negative_cases(kind):
  positives, negatives = PII_CASES[kind]
  for value in positives:
    text, matches = pii.scrub(f'Contact: {value} today.')
    assert text == f'Contact: {pii.PLACEHOLDERS[kind]} today.', value
    assert [m.kind for m in matches] == [kind]
  for value in negatives:
    text, matches = pii.scrub(f'Contact: {value} today.')
    assert matches == [] and text == f'Contact: {value} today.', value


def test_pii_luhn_and_max_hits():
  assert pii.luhn_valid('4111111111111111') and not pii.luhn_valid('4111111111111112')
  stage = stages.PII(CFG.pii)
  doc = lambda t: {'id': ('f', 1), 'text': t, 'metadata': {}}  # noqa: E731
  five = ' '.join(f'u{i}@example.com' for i in range(5))
  verdict = stage.process(doc(five))
  assert verdict.reason == 'edited: PII replaced'
  assert verdict.doc['text'] == ' '.join(['<EMAIL_ADDRESS>'] * 5)
  verdict = stage.process(doc(five + ' u5@example.com'))
  assert verdict.doc is None and verdict.reason == 'more than 5 PII matches'
  assert 'example.com' not in verdict.excerpt  # the report never repeats the PII
  only_email = stages.PII(cfg_of('pii', types=('email',)))
  assert only_email.process(doc('8.8.8.8')).doc['text'] == '8.8.8.8'


# --- language -----------------------------------------------------------------------------

PASSAGES = {
    'en': 'The weather today is fine and the children play in the garden behind the old house.',
    'de': 'Der schnelle braune Fuchs springt über den faulen Hund, und die Kinder spielen im '
          'Garten hinter dem alten Haus.',
    'fr': 'Le renard brun rapide saute par-dessus le chien paresseux pendant que les enfants '
          'jouent dans le jardin.',
    'es': 'El rápido zorro marrón salta sobre el perro perezoso mientras los niños juegan en el '
          'jardín detrás de la casa.',
}


def test_language_keeps_configured_languages_above_threshold():
  from py3langid.langid import MODEL_FILE, LanguageIdentifier
  reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
  stage = stages.Language(CFG.language)
  stage.setup()
  doc = lambda t: {'id': ('f', 1), 'text': t, 'metadata': {'k': 1}}  # noqa: E731
  kept = stage.process(doc(PASSAGES['en']))
  assert kept.doc['metadata']['language'] == 'en' and kept.doc['metadata']['k'] == 1
  for lang in ('de', 'fr', 'es'):
    assert stage.process(doc(PASSAGES[lang])).reason == f'language {lang}'
  two = stages.Language(cfg_of('language', languages=('en', 'de')))
  two.setup()
  assert two.process(doc(PASSAGES['de'])).doc['metadata']['language'] == 'de'
  # The threshold: just at the passage's probability passes, just above fails.
  _, p = reference.classify(PASSAGES['en'])
  at = stages.Language(cfg_of('language', threshold=p))
  above = stages.Language(cfg_of('language', threshold=min(p + 1e-4, 1.0)))
  at.setup()
  above.setup()
  assert at.process(doc(PASSAGES['en'])).doc is not None
  assert above.process(doc(PASSAGES['en'])).reason == f'language probability below {p + 1e-4}'
