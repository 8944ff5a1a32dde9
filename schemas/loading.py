"""Reading configs: YAML files and `--set` overrides (a strict loader: duplicate keys and alias
bombs refused), the packaged configs by name, validation into one `ConfigError` naming the key,
and `documented_yaml`, a config printed back as YAML that loads (`mmae config`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from .config import Config, ConfigError
from pydantic import BaseModel, ValidationError


def _format_location(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def _section_keys(location: tuple) -> list[str]:
    """The keys a config section accepts, found by walking the models along `location`."""
    model: Any = Config
    for part in location:
        if isinstance(part, int):
            continue  # a list item: the list's item type was taken when its field was entered
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        while not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            inner = [arg for arg in get_args(annotation) if arg is not type(None)]
            if not inner:
                return []
            annotation = inner[0]
        model = annotation
    return list(getattr(model, "model_fields", {}))


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        key = _format_location(problem["loc"])
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
            close = difflib.get_close_matches(str(problem["loc"][-1]), _section_keys(problem["loc"][:-1]), n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        if problem["type"] == "value_error":
            message = message.removeprefix("Value error, ")  # our own validators' sentences
        got = problem.get("input")
        # A whole section's validator: its input is the section, not a value worth echoing.
        shown = "" if problem["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        if len(shown) > 120:
            shown = shown[:117] + "...)"
        lines.append(f"{key}: {message}{shown}")
    return "invalid config: " + "; ".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    try:
        return key.strip().split("."), load_yaml(raw, f"--set {text}") if raw != "" else ""
    except ConfigError:
        raise
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({str(error).splitlines()[0]})") from None


MAX_YAML_NODES = 200_000  # a config has hundreds; an alias bomb expands to billions


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                  "YAML would silently keep the last")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse a config document (or a --set value) with `_StrictLoader`."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
        if _expanded_size(data, {}) > MAX_YAML_NODES:
            # Aliases share one object while loading; validating walks every copy ("billion laughs").
            raise ConfigError(f"more than {MAX_YAML_NODES:,} values once aliases are expanded (an alias bomb?)")
        return data
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    finally:
        loader.dispose()


def _expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """How many values `value` is with every alias expanded (each shared object counted once per use)."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in sizes:
        return sizes[id(value)]
    sizes[id(value)] = MAX_YAML_NODES + 1  # a cycle (a recursive alias) is too big as well
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, sizes)
        if total > MAX_YAML_NODES:
            break
    sizes[id(value)] = total
    return total


def apply_override(tree: dict[str, Any], dotted: str) -> None:
    """Apply `a.b.0.c=value` to a plain dict/list tree (the value is parsed as YAML)."""
    path, value = _parse_override(dotted)
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {dotted}: {where} is not an index of the list")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {dotted}: {where} is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {dotted}: {last} is not an index of the list")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(path[:-1])} is not a section")


PACKAGED = Path(__file__).resolve().parent / "configs"  # shipped in the package: pipeline, m3ae, mae, ...


def packaged_configs() -> list[str]:
    return sorted(path.stem for path in PACKAGED.glob("*.yaml"))


def resolve_config_path(given: str | Path) -> Path:
    """A config file: the path itself when it exists, else a packaged config by name (`m3ae`,
    `configs/m3ae.yaml`, `pipeline.yaml`), so an installed mmae works from any folder."""
    path = Path(given)
    if path.exists():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if (PACKAGED / f"{name}.yaml").exists() and (path.parent == Path(".") or path.parent.name == "configs"):
        return PACKAGED / f"{name}.yaml"
    raise ConfigError(f"config file not found: {given} (packaged configs, usable by name: "
                      f"{', '.join(packaged_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing), apply `--set` overrides, validate; raise `ConfigError` on any problem.
    `path` may name a packaged config (`m3ae`, `pipeline.yaml`) when no such file is here."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"), str(path))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for override in overrides or []:
        apply_override(tree, override)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def documented_yaml(config: BaseModel, indent: int = 0) -> str:
    """A config as YAML with every key's type and description as a comment above it."""
    lines: list[str] = []
    pad = " " * indent
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        note = field.description or ""
        kind = _type_name(field.annotation)
        lines.append(f"{pad}# {name} ({kind}){': ' + ' '.join(note.split()) if note else ''}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(documented_yaml(value, indent + 2))
        else:
            plain = _jsonable(value)
            # Block style: a flow mapping per key ("{output: x}") at this indent is not YAML that loads.
            dumped = yaml.safe_dump({name: plain}, default_flow_style=False, sort_keys=False, width=100).rstrip()
            lines.extend(pad + line for line in dumped.splitlines())
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """`Optional[int]` -> "int or null", `Literal["a", "b"]` -> "a | b", `list[str]` -> "list of str"."""
    args = [arg for arg in get_args(annotation)]
    origin = getattr(annotation, "__origin__", None)
    if origin is Literal:
        return " | ".join(str(arg) for arg in args)
    if origin is Union:
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__} of {', '.join(_type_name(arg) for arg in args if arg is not Ellipsis)}"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value
