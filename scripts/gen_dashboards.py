"""Generate the Grafana dashboards in grafana/ (run: make dashboards).

Every panel uses the ${datasource} variable; queries filter on $namespace and $pipeline
(never a hard-coded namespace); panel ids are unique. A test enforces all three.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", pipeline=~"$pipeline"'


def variables(with_pipeline=True):
    v = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "namespace", "type": "query", "datasource": DS, "label": "Namespace",
         "query": {"query": "label_values(sluice_assigned_partitions, namespace)", "refId": "ns"},
         "refresh": 2, "includeAll": True, "multi": True},
    ]
    if with_pipeline:
        v.append({"name": "pipeline", "type": "query", "datasource": DS, "label": "Pipeline",
                  "query": {"query": 'label_values(sluice_assigned_partitions{namespace=~"$namespace"}, pipeline)', "refId": "p"},
                  "refresh": 2, "includeAll": True, "multi": True})
    return {"list": v}


class Board:
    def __init__(self):
        self.panels, self.y, self.next_id = [], 0, 1

    def row(self, title):
        self.panels.append({"id": self.next_id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.next_id += 1
        self.y += 1

    def line(self, panels):
        w = 24 // len(panels)
        for i, (title, unit, targets) in enumerate(panels):
            self.panels.append({
                "id": self.next_id, "type": "timeseries", "title": title, "datasource": DS,
                "gridPos": {"h": 8, "w": w, "x": i * w, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + j)}
                            for j, (e, l) in enumerate(targets)],
            })
            self.next_id += 1
        self.y += 8


def pipeline():
    b = Board()
    b.row("Throughput")
    b.line([
        ("Records in / out", "ops", [
            (f"sum by (pipeline) (rate(sluice_messages_consumed_total{{{SEL}}}[1m]))", "{{pipeline}} in"),
            (f"sum by (pipeline) (rate(sluice_messages_delivered_total{{{SEL}}}[1m]))", "{{pipeline}} out"),
        ]),
        ("Outputs per sink", "ops", [
            (f"sum by (pipeline, sink) (rate(sluice_sink_outputs_total{{{SEL}}}[1m]))", "{{pipeline}} {{sink}}"),
        ]),
    ])
    b.row("Latency")
    b.line([
        ("End-to-end latency p50 / p99", "s", [
            (f"histogram_quantile(0.5, sum by (le, pipeline) (rate(sluice_end_to_end_latency_seconds_bucket{{{SEL}}}[5m])))", "{{pipeline}} p50"),
            (f"histogram_quantile(0.99, sum by (le, pipeline) (rate(sluice_end_to_end_latency_seconds_bucket{{{SEL}}}[5m])))", "{{pipeline}} p99"),
        ]),
        ("Processing latency p50 / p99", "s", [
            (f"histogram_quantile(0.5, sum by (le, pipeline) (rate(sluice_processing_latency_seconds_bucket{{{SEL}}}[5m])))", "{{pipeline}} p50"),
            (f"histogram_quantile(0.99, sum by (le, pipeline) (rate(sluice_processing_latency_seconds_bucket{{{SEL}}}[5m])))", "{{pipeline}} p99"),
        ]),
    ])
    b.row("Lag")
    b.line([
        ("Lag per partition", "short", [
            (f"sum by (pipeline, partition) (sluice_consumer_lag{{{SEL}}})", "{{pipeline}} p{{partition}}"),
        ]),
        ("Total lag", "short", [(f"sum by (pipeline) (sluice_consumer_lag{{{SEL}}})", "{{pipeline}}")]),
        ("Time to drain", "s", [(f"sluice:time_to_drain_seconds{{{SEL}}}", "{{pipeline}}")]),
    ])
    b.row("Pressure and failures")
    b.line([
        ("Paused / stalled partitions", "short", [
            (f"sum by (pipeline) (sluice_partition_paused{{{SEL}}})", "{{pipeline}} paused"),
            (f"sum by (pipeline) (sluice_partition_stalled{{{SEL}}})", "{{pipeline}} stalled"),
        ]),
        ("Failed records and sink retries", "ops", [
            (f"sum by (pipeline, stage) (rate(sluice_messages_failed_total{{{SEL}}}[5m]))", "{{pipeline}} failed in {{stage}}"),
            (f"sum by (pipeline, sink) (rate(sluice_sink_retries_total{{{SEL}}}[5m]))", "{{pipeline}} retries {{sink}}"),
            (f"sum by (pipeline, stage, class) (rate(sluice_dead_letters_total{{{SEL}}}[5m]))", "{{pipeline}} dead-lettered {{stage}}/{{class}}"),
        ]),
        ("In-flight bytes", "bytes", [(f"sum by (pipeline, pod) (sluice_in_flight_bytes{{{SEL}}})", "{{pod}}")]),
    ])
    b.row("Commits and batches")
    b.line([
        ("Commit latency p99", "s", [
            (f"histogram_quantile(0.99, sum by (le, pipeline) (rate(sluice_commit_latency_seconds_bucket{{{SEL}}}[5m])))", "{{pipeline}}"),
        ]),
        ("Batch size (outputs) p50", "short", [
            (f"histogram_quantile(0.5, sum by (le, pipeline, sink) (rate(sluice_batch_size_messages_bucket{{{SEL}}}[5m])))", "{{pipeline}} {{sink}}"),
        ]),
    ])
    b.row("Resources and scaling")
    b.line([
        ("CPU per pod", "percentunit", [(f"rate(process_cpu_seconds_total{{{SEL}}}[1m])", "{{pod}}")]),
        ("Memory per pod", "bytes", [(f"process_resident_memory_bytes{{{SEL}}}", "{{pod}}")]),
        ("Replicas desired vs current", "short", [
            (f"sluice_controller_desired_replicas{{{SEL}}}", "{{pipeline}} desired"),
            (f"sluice_controller_current_replicas{{{SEL}}}", "{{pipeline}} current"),
        ]),
    ])
    return {"title": "sluice / Pipeline overview", "uid": "sluice-pipeline", "tags": ["sluice"],
            "schemaVersion": 39, "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
            "templating": variables(), "panels": b.panels}


def controller():
    b = Board()
    sel = 'namespace=~"$namespace"'
    b.row("Reconciliation")
    b.line([
        ("Reconciliations by result", "ops", [(f"sum by (result) (rate(sluice_controller_reconciliations_total{{{sel}}}[5m]))", "{{result}}")]),
        ("Reconcile duration p99", "s", [(f"histogram_quantile(0.99, sum by (le) (rate(sluice_controller_reconcile_duration_seconds_bucket{{{sel}}}[5m])))", "p99")]),
        ("Errors by category", "ops", [(f"sum by (category) (rate(sluice_controller_errors_total{{{sel}}}[5m]))", "{{category}}")]),
    ])
    b.row("Scaling")
    b.line([
        ("Scaling decisions", "ops", [(f"sum by (pipeline, reason) (rate(sluice_controller_scaling_decisions_total{{{sel}}}[5m]))", "{{pipeline}} {{reason}}")]),
        ("Desired vs current vs ready", "short", [
            (f"sluice_controller_desired_replicas{{{sel}}}", "{{pipeline}} desired"),
            (f"sluice_controller_current_replicas{{{sel}}}", "{{pipeline}} current"),
            (f"sluice_controller_ready_replicas{{{sel}}}", "{{pipeline}} ready"),
        ]),
        ("Observed lag and partitions", "short", [
            (f"sluice_controller_observed_lag{{{sel}}}", "{{pipeline}} lag"),
            (f"sluice_controller_partitions{{{sel}}}", "{{pipeline}} partitions"),
        ]),
    ])
    return {"title": "sluice / Controller", "uid": "sluice-controller", "tags": ["sluice"],
            "schemaVersion": 39, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
            "templating": variables(with_pipeline=False), "panels": b.panels}


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "grafana"
    os.makedirs(out, exist_ok=True)
    for name, board in (("sluice-pipeline.json", pipeline()), ("sluice-controller.json", controller())):
        with open(os.path.join(out, name), "w") as f:
            json.dump(board, f, indent=2)
            f.write("\n")
