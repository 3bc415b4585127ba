#!/usr/bin/env python3
"""Writes deploy/grafana/expertmesh.json: a Grafana dashboard over the metric names every
expertmesh role serves (the gateway's /metrics on its HTTP port, each role's --metrics).
Run it again after a metric changes: python3 deploy/grafana/make_dashboard.py"""
import json
import pathlib

# (title, unit, [(PromQL, legend)]) per panel, in rows of three.
ROWS = [
    ("API (gateways)", [
        ("Requests per second by status", "reqps",
         [("sum by (code) (rate(expertmesh_requests_total[1m]))", "{{code}}")]),
        ("Time to first token", "s",
         [("histogram_quantile(0.5, sum by (le) (rate(expertmesh_time_to_first_token_seconds_bucket[5m])))", "p50"),
          ("histogram_quantile(0.99, sum by (le) (rate(expertmesh_time_to_first_token_seconds_bucket[5m])))", "p99")]),
        ("Inter-token latency", "s",
         [("histogram_quantile(0.5, sum by (le) (rate(expertmesh_inter_token_latency_seconds_bucket[5m])))", "p50"),
          ("histogram_quantile(0.99, sum by (le) (rate(expertmesh_inter_token_latency_seconds_bucket[5m])))", "p99")]),
        ("Output tokens per second", "short",
         [("sum(rate(expertmesh_completion_tokens_total[1m]))", "tokens/s")]),
        ("Requests in flight, migrations", "short",
         [("sum(expertmesh_requests_in_flight)", "in flight"),
          ("sum(rate(expertmesh_request_migrations_total[5m]))", "migrations/s")]),
        ("Prefix cache hit rate", "percentunit",
         [("max(expertmesh_prefix_cache_hit_rate)", "hit rate")]),
    ]),
    ("Attention workers", [
        ("Sequences running and waiting", "short",
         [("expertmesh_running_sequences{job=\"attention-worker\"}", "running {{instance}}"),
          ("expertmesh_queue_depth{job=\"attention-worker\"}", "waiting {{instance}}")]),
        ("KV blocks", "short",
         [("expertmesh_kv_blocks_used{job=\"attention-worker\"}", "used {{instance}}"),
          ("expertmesh_prefix_cache_blocks", "prefix cache {{instance}}"),
          ("expertmesh_kv_blocks_total{job=\"attention-worker\"}", "total {{instance}}")]),
        ("Where a step's time goes", "percentunit",
         [("rate(expertmesh_engine_forward_seconds_total{job=\"attention-worker\"}[1m]) - rate(expertmesh_engine_expert_wait_seconds_total{job=\"attention-worker\"}[1m])", "compute {{instance}}"),
          ("rate(expertmesh_engine_expert_wait_seconds_total{job=\"attention-worker\"}[1m])", "expert wait {{instance}}"),
          ("rate(expertmesh_engine_step_seconds_total{job=\"attention-worker\"}[1m]) - rate(expertmesh_engine_forward_seconds_total{job=\"attention-worker\"}[1m])", "sampling and serving {{instance}}")]),
        ("Tokens per second", "short",
         [("rate(expertmesh_engine_tokens_generated_total[1m])", "generated {{instance}}"),
          ("rate(expertmesh_engine_tokens_forwarded_total[1m])", "forwarded {{instance}}")]),
        ("Preemptions and evictions", "short",
         [("rate(expertmesh_engine_preemptions_total[5m])", "preemptions/s {{instance}}"),
          ("rate(expertmesh_prefix_cache_evicted_blocks_total[5m])", "evicted blocks/s {{instance}}")]),
        ("Routed batch round trip", "s",
         [("rate(expertmesh_routed_batch_seconds_total[1m]) / rate(expertmesh_routed_batches_total[1m])", "mean {{instance}}")]),
    ]),
    ("Expert workers", [
        ("Dispatches per second", "reqps",
         [("rate(expertmesh_expert_dispatches_total[1m])", "{{instance}}"),
          ("rate(expertmesh_expert_dispatches_refused_total[1m])", "refused {{instance}}"),
          ("rate(expertmesh_expert_dispatches_expired_total[1m])", "expired {{instance}}")]),
        ("Queue depth", "short",
         [("expertmesh_expert_queue_depth", "{{instance}}")]),
        ("Dispatches merged per computation", "short",
         [("rate(expertmesh_expert_merged_dispatches_total[1m]) / rate(expertmesh_expert_computations_total[1m])", "{{instance}}")]),
        ("Compute time per layer", "percentunit",
         [("sum by (layer) (rate(expertmesh_expert_compute_seconds_total[1m]))", "layer {{layer}}")]),
        ("Rows per second per expert", "short",
         [("sum by (expert) (rate(expertmesh_expert_rows_by_expert_total[1m]))", "expert {{expert}}")]),
        ("Rows per second per layer", "short",
         [("sum by (layer) (rate(expertmesh_expert_rows_total[1m]))", "layer {{layer}}")]),
        ("Expert bytes moved by placements", "bytes",
         [("increase(expertmesh_expert_loaded_bytes_total[10m])", "{{instance}} (10 min)")]),
    ]),
    ("Coordinators", [
        ("Raft term and leader", "short",
         [("max(expertmesh_raft_term)", "term"),
          ("max(expertmesh_raft_leader_id)", "leader id"),
          ("max(increase(expertmesh_raft_leader_changes_total[10m]))", "leader changes (10 min)")]),
        ("Commit index and apply lag", "short",
         [("expertmesh_raft_commit_index", "commit {{instance}}"),
          ("expertmesh_raft_apply_lag", "apply lag {{instance}}")]),
        ("Placement", "short",
         [("max(expertmesh_placement_epoch)", "epoch"),
          ("max(expertmesh_placement_pending)", "pending"),
          ("min(expertmesh_cluster_servable)", "servable")]),
        ("Workers by state", "short",
         [("max by (role, state) (expertmesh_workers)", "{{role}} {{state}}")]),
    ]),
]


def panels():
    out, y, pid = [], 0, 1
    for row_title, row in ROWS:
        out.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                    "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}})
        pid += 1
        y += 1
        for i, (title, unit, queries) in enumerate(row):
            out.append({
                "type": "timeseries", "title": title, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"x": (i % 3) * 8, "y": y + (i // 3) * 8, "w": 8, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(65 + k), "expr": expr, "legendFormat": legend}
                            for k, (expr, legend) in enumerate(queries)],
            })
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return out


dashboard = {
    "title": "expertmesh",
    "uid": "expertmesh",
    "schemaVersion": 39,
    "time": {"from": "now-30m", "to": "now"},
    "refresh": "10s",
    "tags": ["expertmesh", "llm-serving"],
    "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                             "label": "Prometheus"}]},
    "panels": panels(),
}
path = pathlib.Path(__file__).with_name("expertmesh.json")
path.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {path}")
