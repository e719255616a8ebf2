"""Analytics: hourly aggregates of runs, built by `analytics.aggregate`, read by the
analytics API (plus the live tail the aggregates do not cover yet) and streamed on the
`analytics` WebSocket channel."""
