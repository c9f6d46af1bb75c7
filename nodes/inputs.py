"""The nodes' own checks of the values they are given, driven by each node's V3 schema and run at the start of every
execute (WanLeanNode wraps it): a combo value must be one of its options (the schema is built again when the node runs,
so a model file added since start-up counts), a number must lie within the input's min and max, and a file a user can
upload (a combo with `upload`) must resolve, links followed, to a file inside its ComfyUI folder (input/, or output/ /
temp/ for names annotated `name [output]` / `name [temp]`) before anything opens it. ComfyUI 0.3.75 checks no V3 combo
value and no value that arrives over a link; newer hosts check some of them: the pack relies on neither."""
import functools
import inspect
import numbers
import os

import folder_paths
from comfy_api.latest import io

SHOWN_OPTIONS = 12  # an error lists this many options at most (model folders can hold hundreds of files)
FOLDER_KINDS = ("input", "output", "temp")  # ComfyUI's annotations: "name.wav [output]" is output/name.wav
CHECKED = "wanlean_checks_inputs"  # marks an execute that checks its inputs first


def options_text(options):
    if not options:
        return "it has no options (a file list: its folder holds no file it can take)"
    shown = ", ".join(str(o) for o in options[:SHOWN_OPTIONS])
    return f"its options: {shown}" + (f", ... ({len(options)} in all)" if len(options) > SHOWN_OPTIONS else "")


def combo_problem(spec, value):
    options = list(spec.options or [])
    values = value if getattr(spec, "multiselect", False) and isinstance(value, (list, tuple)) else [value]
    wrong = [v for v in values if v not in options]
    return f"{wrong[0]!r} is not one of its options; {options_text(options)}" if wrong else None


def range_text(low, high):
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def number_problem(spec, value):
    """Why `value` does not fit an io.Int / io.Float input (None: it fits). NaN fits no range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{value!r} is not a number"
    if isinstance(spec, io.Int.Input) and not isinstance(value, numbers.Integral):
        return f"{value!r} is not a whole number"
    low, high = spec.min, spec.max
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        return f"{value!r} is out of range: it must be {range_text(low, high)}"
    return None


def inside(path, root):
    return path != root and os.path.commonpath([path, root]) == root


def resolve_file(name, kind="input"):
    """The real path (links followed) of the file `name` names in ComfyUI's `kind` folder (input, output, temp; an
    annotation such as "speech.wav [output]" picks the folder). ValueError, before the file is opened or even looked
    at, when the name leads outside that folder (.., an absolute path, a link to a file elsewhere); ValueError when no
    such file is there."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ValueError(f"{name!r} names no file")
    kind = next((k for k in FOLDER_KINDS if name.endswith(f"[{k}]")), kind)
    bare = folder_paths.annotated_filepath(name)[0]
    root = os.path.realpath(folder_paths.get_directory_by_type(kind))
    path = os.path.realpath(os.path.join(root, bare))
    where = f"ComfyUI's {kind} folder"
    if not inside(path, root):
        via_link = inside(os.path.normpath(os.path.join(root, bare)), root)
        raise ValueError(f"{name!r} {'is a link to a file' if via_link else 'is'} outside {where}: pick a file in "
                         f"that folder (or upload one)")
    if not os.path.isfile(path):
        raise ValueError(f"{name!r} is not a file in {where}")
    return path


def upload_kind(spec):
    """The ComfyUI folder an upload combo's files live in: its image_folder, else input."""
    folder = getattr(spec, "image_folder", None)
    return getattr(folder, "value", folder) or "input"


def problem(spec, value):
    """Why input `spec` (a V3 io.*.Input) refuses `value`; None where it takes it (or does not check that kind)."""
    if value is None:  # not given: the node's default applies
        return None
    if isinstance(spec, io.Combo.Input) and getattr(spec, "upload", None) is not None:
        try:
            resolve_file(value, upload_kind(spec))
        except ValueError as e:
            return str(e)
        return None
    if isinstance(spec, io.Combo.Input):
        return combo_problem(spec, value)
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        return number_problem(spec, value)
    return None


def refusal(schema, values):
    """The message refusing the first input of `schema` whose value in `values` ({input id: value}) it does not take;
    None when it takes them all."""
    for spec in schema.inputs:
        why = problem(spec, values.get(spec.id))
        if why is not None:
            return f"{schema.display_name}, input '{spec.id}': {why}"
    return None


def checking_first(cls):
    """Make the execute that `cls` defines itself check its values against the node's schema (built afresh) before it
    runs; a value it refuses raises ValueError naming node, input and what the input takes. ComfyUI derives classes
    from a node for each run (clones, locked copies) that inherit the checking execute: they are left as they are."""
    method = cls.__dict__.get("execute")
    if method is None or getattr(method.__func__, CHECKED, False):
        return
    func = method.__func__
    if inspect.iscoroutinefunction(func):
        raise TypeError(f"{cls.__name__}.execute is async: checking_first wraps synchronous executes only")
    signature = inspect.signature(func)

    @functools.wraps(func)
    def execute(node, *args, **kwargs):
        message = refusal(node.define_schema(), signature.bind_partial(node, *args, **kwargs).arguments)
        if message is not None:
            raise ValueError(message)
        return func(node, *args, **kwargs)

    setattr(execute, CHECKED, True)
    cls.execute = classmethod(execute)
