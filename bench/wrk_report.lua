-- wrk's done() hook for bench/api_latency.py: one JSON line, prefixed "WRK_JSON ", with the run's figures.
-- Only done() is defined, so wrk keeps its fast path (no Lua per request). Latencies are in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0), latency.max))
end
