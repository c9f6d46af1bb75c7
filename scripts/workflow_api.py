"""Convert a UI-format ComfyUI workflow (what the frontend saves) into the API format /prompt takes.

Follows the frontend's own rules (comfyui-frontend-package 1.32, graphToPrompt / ExecutableNodeDTO):
- widgets_values holds one value per widget input, in `input_order` (required, then optional), linked widgets
  included; an INT input with control_after_generate (default: named seed/noise_seed) stores one extra value
  after it, a COMBO with control_after_generate two (control + filter). Trailing extras (upload buttons) are ignored.
- A link replaces the widget value; Reroute nodes are followed, a PrimitiveNode's value is inlined, muted nodes
  (mode 2) are dropped along with the inputs that lead to them, bypassed nodes (mode 4) pass the input of the
  matching type through (same slot index first, then the first exact type, then the first compatible type).
- Notes are skipped; list-valued widgets are wrapped as {"__value__": [...]}.
"""
import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4


def input_specs(info):
    """[(name, type, options)] of a node definition in the frontend's widget order."""
    groups = {g: info.get("input", {}).get(g) or {} for g in ("required", "optional")}
    order = info.get("input_order") or {g: list(groups[g]) for g in groups}
    specs, seen = [], set()
    for g in ("required", "optional"):
        for name in order.get(g, []):
            if name in groups[g] and name not in seen:
                seen.add(name)
                specs.append((name, groups[g][name]))
    specs += [(n, s) for g in groups.values() for n, s in g.items() if n not in seen]
    return [(n, s[0] if isinstance(s[0], str) else "COMBO", s[1] if len(s) > 1 else {}) for n, s in specs]


def combo_options(spec):
    """The options of a COMBO input spec from /object_info: V1's [options, {...}] or V3's ["COMBO", {"options": ...}]."""
    return spec[0] if isinstance(spec[0], list) else (spec[1] if len(spec) > 1 else {}).get("options", [])


def extra_widget_values(name, kind, opts):
    """How many hidden control values the frontend stores after this widget's value."""
    control = opts.get("control_after_generate")
    if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
        return 1
    return 2 if kind == "COMBO" and control else 0


def widget_values(node, info):
    """{input name: value} from a node's widgets_values (list or dict form)."""
    widgets = [(n, k, o) for n, k, o in input_specs(info)
               if (k in WIDGET_TYPES or o.get("widgetType")) and not o.get("forceInput")]
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        out = {n: values[n] for n, _, _ in widgets if n in values}
    else:
        out, i = {}, 0
        for name, kind, opts in widgets:
            if i >= len(values):
                break
            out[name] = values[i]
            i += 1 + extra_widget_values(name, kind, opts)
    return {n: {"__value__": v} if isinstance(v, list) else v for n, v in out.items()}


def types_match(a, b):
    """LiteGraph's connection rule: '*'/empty matches all, else the comma-separated type sets intersect."""
    if not a or not b or a == "*" or b == "*":
        return True
    return bool(set(str(a).upper().split(",")) & set(str(b).upper().split(",")))


def bypass_input(node, slot, want):
    """The input of a bypassed node that stands in for its output `slot` when feeding type `want` (or None)."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else want
    if want in ("*", ""):
        return inputs[slot] if slot < len(inputs) else (inputs[0] if inputs else None)
    fits = [types_match(i.get("type"), out_type) and types_match(i.get("type"), want) for i in inputs]
    if slot < len(inputs) and fits[slot]:
        return inputs[slot]
    exact = [i for i in inputs if i.get("type") == want]
    return (exact or [i for i, ok in zip(inputs, fits) if ok] or [None])[0]


class _Graph:
    """Nodes and links of a UI workflow, with the frontend's link resolution."""

    def __init__(self, workflow):
        self.nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
        self.links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = (str(link[1]), int(link[2]))

    def resolve(self, link_id, want, seen=()):
        """What a link delivers: ("link", [node_id, slot]), ("value", v), or None (nothing)."""
        if link_id is None or link_id not in self.links:
            return None
        origin, slot = self.links[link_id]
        node = self.nodes.get(origin)
        if node is None or (origin, slot) in seen:
            return None
        seen = seen + ((origin, slot),)
        kind, mode = node.get("type"), node.get("mode", 0)
        if kind == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if kind == "Reroute":
            inputs = node.get("inputs") or []
            return self.resolve(inputs[0].get("link"), want, seen) if inputs else None
        if mode == BYPASSED:
            inp = bypass_input(node, slot, want)
            return self.resolve(inp.get("link"), want, seen) if inp else None
        return ("link", [origin, slot])


def ui_to_api(workflow, object_info):
    """API-format prompt {node_id: {"class_type", "inputs", "_meta": {"title"}}} from a UI workflow."""
    graph, api = _Graph(workflow), {}
    for node_id, node in graph.nodes.items():
        kind = node.get("type")
        if kind in NOTE_TYPES or kind in ("Reroute", "PrimitiveNode") or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise ValueError(f"node {node_id}: unknown node type {kind!r} (pack not loaded, or a subgraph/group node)")
        info = object_info[kind]
        inputs = widget_values(node, info)
        for inp in node.get("inputs") or []:
            got = graph.resolve(inp.get("link"), inp.get("type"))
            if got is not None:
                wrap = got[0] == "value" and isinstance(got[1], list)
                inputs[inp["name"]] = {"__value__": got[1]} if wrap else got[1]
        title = node.get("title") or info.get("display_name") or kind
        api[node_id] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    for entry in api.values():  # drop inputs fed by muted / missing nodes, as the frontend does
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in api:
                del entry["inputs"][name]
    return api


def set_inputs(api, overrides):
    """Copy of `api` with {"<class_type, title or node id>.<input>": value} applied; every key must match."""
    api = copy.deepcopy(api)
    for key, value in overrides.items():
        target, _, name = key.rpartition(".")
        nodes = [e for nid, e in api.items() if target in (nid, e["class_type"], e.get("_meta", {}).get("title"))]
        if not target or not nodes:
            raise KeyError(f"override {key!r}: no node with class_type, title or id {target!r}")
        for entry in nodes:
            if name not in entry["inputs"]:
                raise KeyError(f"override {key!r}: {entry['class_type']} has no input {name!r} "
                               f"(has {sorted(entry['inputs'])})")
            entry["inputs"][name] = value
    return api
