"""The server's Prometheus metrics: requests, tokens, queue depth and latencies.

Each app gets its own `CollectorRegistry`, so several servers in one process (tests)
never share counters. Latencies are measured where the client feels them, in the HTTP
layer: time to first token from the moment the request arrived (queueing included) and
the gaps between a request's tokens as they reach the server. The engine's own state
(queue depth, running requests, free KV pages) is read from `engine.stats()` at scrape
time, so it is never stale.
"""

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# No `*_created` series beside each counter and histogram: they only double the text.
prometheus_client.disable_created_metrics()
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# engine.stats() key -> (metric name, help).
_ENGINE_GAUGES = {
    'waiting': ('kiln_queue_depth', 'Requests waiting for a decode slot.'),
    'running': ('kiln_running_requests', 'Requests holding a decode slot.'),
    'free_pages': ('kiln_free_kv_pages', 'Free pages of the paged KV cache.'),
}


class _EngineCollector:
  """Gauges read from the engine when Prometheus scrapes."""

  def __init__(self, stats: Callable[[], dict]):
    self._stats = stats

  def collect(self):
    stats = self._stats()
    for key, (name, doc) in _ENGINE_GAUGES.items():
      if key in stats:
        yield GaugeMetricFamily(name, doc, value=float(stats[key]))


class ServerMetrics:
  """The counters and histograms one server updates."""

  def __init__(self, engine_stats: Callable[[], dict]):
    self.registry = CollectorRegistry()
    self.requests = Counter('kiln_requests', 'HTTP requests by endpoint and status code.',
                            ['endpoint', 'status'], registry=self.registry)
    self.prompt_tokens = Counter('kiln_prompt_tokens', 'Prompt tokens of accepted requests.',
                                 registry=self.registry)
    self.generation_tokens = Counter('kiln_generation_tokens', 'Tokens generated.',
                                     registry=self.registry)
    self.ttft = Histogram('kiln_time_to_first_token_seconds',
                          'From the request arriving to its first generated token.',
                          buckets=_TTFT_BUCKETS, registry=self.registry)
    self.itl = Histogram('kiln_inter_token_latency_seconds',
                         'Between consecutive generated tokens of one request.',
                         buckets=_ITL_BUCKETS, registry=self.registry)
    self.registry.register(_EngineCollector(engine_stats))

  def render(self) -> bytes:
    return generate_latest(self.registry)
