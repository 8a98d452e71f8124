#!/usr/bin/env python3
"""Offline Helm checks for tests/helm.rs: lint, schema validation and rendering, with no helm binary and no cluster.

Uses the PyPI package helm-python-sdk (module `helm_python`: the Helm v4 Go SDK behind a C ABI), installed by
tests/setup.sh. One JSON request on stdin, one JSON answer on stdout:

  {"op": "lint",     "chart": DIR, "values": {...}}          -> {"ok": true, "lint": {messages, errors}}
  {"op": "validate", "chart": DIR, "values": {...}}          -> {"ok": true} | {"ok": false, "error": "..."}
  {"op": "render",   "chart": DIR, "values": {...},
   "name": RELEASE, "namespace": NS}                          -> {"ok": true, "objects": [...], "notes": "..."}
                                                                | {"ok": false, "error": "..."}

Rendering validates the values against values.schema.json first (as `helm install` does). Rendered manifests
are parsed as YAML (strictly: a duplicate key is an error, as in the Kubernetes API server) and returned as
JSON objects, so the Rust tests assert on structure, not on text. Exit status 2 means the checker itself could
not run (missing module, bad request); chart problems are answers, not failures.
"""
import json
import sys


def fail_setup(message):
    print(json.dumps({"setup_error": message}))
    sys.exit(2)


try:
    import helm_python as helm
except ImportError as e:  # pragma: no cover - environment problem
    fail_setup(f"python module helm_python is missing ({e}); run ./tests/setup.sh (pip install helm-python-sdk)")
try:
    import yaml
except ImportError as e:  # pragma: no cover
    fail_setup(f"python module yaml is missing ({e}); run ./tests/setup.sh (pip install pyyaml)")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def main():
    try:
        req = json.load(sys.stdin)
        op, chart_dir, values = req["op"], req["chart"], req.get("values") or {}
    except (ValueError, KeyError) as e:
        fail_setup(f"bad request on stdin: {e}")
    try:
        if op == "lint":
            report = helm.lint(chart_dir, values, strict=True, namespace=req.get("namespace", "default"))
            return {"ok": True, "lint": report}
        chart = helm.Chart.load(chart_dir)
        chart.validate_schema(values)
        if op == "validate":
            return {"ok": True}
        if op != "render":
            fail_setup(f"unknown op {op!r}: use lint, validate or render")
        rendered = chart.render(
            values, name=req.get("name", "vol1"), namespace=req.get("namespace", "default"), is_install=True
        )
    except helm.HelmError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    objects, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        try:
            docs = list(yaml.load_all(text, Loader=StrictLoader))
        except yaml.YAMLError as e:
            return {"ok": False, "error": f"{path} is not valid YAML: {e}\n{text}"}
        for doc in docs:
            if doc is not None:
                objects.append({"template": path, "object": doc})
    return {"ok": True, "objects": objects, "notes": notes}


if __name__ == "__main__":
    print(json.dumps(main()))
