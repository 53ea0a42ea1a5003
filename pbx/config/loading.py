"""Loading configuration from YAML file, ``.env`` and environment.

Sources, highest priority first:

1. real environment variables ``PBX_*`` (``__`` separates nesting levels,
   names are case-insensitive), e.g. ``PBX_SIP__PORT=5070``;
2. the ``.env`` file that sits **next to the config file** (for the default
   ``./config.yml`` that is ``./.env``; for ``PBX_CONFIG=/etc/pbx/pbx.yml`` it
   is ``/etc/pbx/.env``).  It is read with the same names as the environment,
   and the real environment wins.  ``PBX_CONFIG`` inside ``.env`` is ignored
   (the file must be chosen before its ``.env`` can be found);
3. the YAML config file: ``load_settings(path)``, else ``$PBX_CONFIG``, else
   ``./config.yml``.  An explicitly named file (argument or ``$PBX_CONFIG``)
   must exist; the implicit ``./config.yml`` may be absent;
4. defaults from :mod:`pbx.config.model`.

Every failure becomes a :class:`ConfigError` whose text names the key, where
the value came from and how to fix it, with secrets masked.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from pbx.config.model import (
    _FILE_DATA,
    MASK,
    Settings,
    collect_warnings,
    is_secret_key,
    iter_leaf_keys,
    mask_url_password,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_NAME",
    "ConfigError",
    "ConfigIssue",
    "describe_sources",
    "env_var_name",
    "load_settings",
]

#: Environment variable naming the config file.
CONFIG_ENV_VAR: Final = "PBX_CONFIG"
#: File looked up in the current directory when nothing else is given.
DEFAULT_CONFIG_NAME: Final = "config.yml"
ENV_PREFIX: Final = "PBX_"
ENV_DELIMITER: Final = "__"
DOTENV_NAME: Final = ".env"


class _Auto:
    """Sentinel type: "find the .env next to the config file"."""

    def __repr__(self) -> str:
        return "AUTO"


AUTO: Final = _Auto()


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in the configuration.

    ``key`` is the dotted setting path (``sip.port``); ``source`` says where the
    offending value came from (``PBX_SIP__PORT``, ``config.yml line 3``) when known.
    """

    key: str
    message: str
    fix: str
    source: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """JSON-able form (for ``pbx validate-config --json`` and the ops API)."""
        return {"key": self.key, "message": self.message, "fix": self.fix, "source": self.source}

    def __str__(self) -> str:
        where = f"{self.key} (from {self.source})" if self.source else self.key
        head = f"{where}: {self.message}" if where else self.message
        return f"{head}\n    fix: {self.fix}" if self.fix else head


class ConfigError(Exception):
    """The configuration cannot be loaded; ``errors`` lists every problem found.

    ``str()`` is meant to be printed to an operator as-is: no traceback, no secrets.
    """

    def __init__(self, errors: Sequence[ConfigIssue], config_file: Path | None = None) -> None:
        self.errors: list[ConfigIssue] = list(errors)
        self.config_file = config_file
        super().__init__(self._render())

    @classmethod
    def single(
        cls, key: str, message: str, fix: str, *, source: str | None = None,
        config_file: Path | None = None,
    ) -> ConfigError:
        """Shorthand for an error with exactly one issue."""
        return cls([ConfigIssue(key, message, fix, source)], config_file)

    def as_dicts(self) -> list[dict[str, str | None]]:
        """Every issue as a JSON-able dict (secrets are already masked in the text)."""
        return [issue.as_dict() for issue in self.errors]

    def _render(self) -> str:
        where = f" (config file: {self.config_file})" if self.config_file else ""
        count = len(self.errors)
        noun = "problem" if count == 1 else "problems"
        lines = [f"invalid PBX configuration{where}: {count} {noun}"]
        lines.extend(f"  - {issue}" for issue in self.errors)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()


# --------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env_file: str | os.PathLike[str] | _Auto | None = AUTO,
) -> Settings:
    """Load the effective configuration; raise :class:`ConfigError` on any problem.

    ``path`` overrides ``$PBX_CONFIG`` / ``./config.yml``.  ``env_file`` defaults
    to the ``.env`` next to the config file; pass ``None`` to skip ``.env``.
    """
    config_path, explicit = _choose_config_file(path)
    file_data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    file_warnings: list[str] = []
    used_file: Path | None = None
    if config_path.exists() or explicit:
        file_data, lines, file_warnings = _read_yaml(config_path)
        used_file = config_path

    if isinstance(env_file, _Auto):
        dotenv_path: Path | None = config_path.parent / DOTENV_NAME
    else:
        dotenv_path = Path(env_file) if env_file is not None else None
    if dotenv_path is not None and not dotenv_path.is_file():
        dotenv_path = None
    dotenv_vars = _read_dotenv(dotenv_path)

    origin = _Origins(os.environ, dotenv_vars, dotenv_path, used_file, lines)
    token = _FILE_DATA.set(file_data)
    try:
        settings = Settings(_env_file=dotenv_path)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_issues_from_validation(exc, origin), used_file) from None
    except SettingsError as exc:
        raise ConfigError([_issue_from_settings_error(exc)], used_file) from None
    finally:
        _FILE_DATA.reset(token)

    settings._config_file = used_file
    settings._file_data = file_data
    settings._env_file = dotenv_path
    settings._sources = origin.describe_all()
    settings._warnings = [
        *file_warnings, *origin.unknown_env_warnings(), *collect_warnings(settings)
    ]
    return settings


def describe_sources(settings: Settings) -> dict[str, str]:
    """Map each dotted setting to where its value came from.

    Values look like ``default``, ``derived``, ``file (config.yml line 4)``,
    ``env (PBX_SIP__PORT)`` or ``.env (PBX_API__TOKEN)``.  Settings built
    without :func:`load_settings` report every key as ``default``/``init``.
    """
    if settings._sources:
        return dict(settings._sources)
    return {key: ("init" if _is_set(settings, key) else "default")
            for key in iter_leaf_keys(Settings)}


def env_var_name(key: str) -> str:
    """The environment variable that overrides dotted ``key`` (``sip.port`` → ``PBX_SIP__PORT``)."""
    return ENV_PREFIX + ENV_DELIMITER.join(key.split(".")).upper()


# --------------------------------------------------------------------------
# file selection and reading
# --------------------------------------------------------------------------


def _choose_config_file(path: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Return (path, explicit): the argument, then ``$PBX_CONFIG``, then ``./config.yml``."""
    if path is not None and str(path) != "":
        return Path(path).expanduser(), True
    from_env = getenv_ci(os.environ, CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser(), True
    return Path.cwd() / DEFAULT_CONFIG_NAME, False


def getenv_ci(environ: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive env lookup (exact case wins), matching pydantic-settings."""
    if name in environ:
        return environ[name]
    lowered = name.lower()
    for key, value in environ.items():
        if key.lower() == lowered:
            return value
    return None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """Parse the config file into (mapping, key→line map, warnings)."""
    def fail(message: str, fix: str) -> ConfigError:
        return ConfigError.single("", message, fix, config_file=path)

    if not path.exists():
        raise fail(
            f"config file {path} does not exist",
            "create it (see config.yml in the repository), fix the path, "
            f"or unset {CONFIG_ENV_VAR}",
        )
    if path.is_dir():
        raise fail(f"config file {path} is a directory", "point to a YAML file instead")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read config file {path}: {exc}",
                   "check the file permissions and that it is UTF-8 text") from None

    try:
        # The reader rejects control characters while it is constructed, so it belongs
        # inside the try as well.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise fail(f"{path}: invalid YAML: {exc}",
                   "remove control characters; save the file as UTF-8 text") from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = exc.problem or exc.context or "syntax error"
        raise fail(
            f"{path}: invalid YAML at {where}: {problem}",
            f"fix the YAML syntax near line {mark.line + 1 if mark else '?'} "
            "(check indentation, colons and quoting)",
        ) from None
    except yaml.YAMLError as exc:
        raise fail(f"{path}: invalid YAML: {exc}", "fix the YAML syntax") from None
    finally:
        loader.dispose()

    if data is None:
        return {}, {}, []  # empty file (or only comments): all defaults
    if not isinstance(data, dict):
        raise fail(
            f"{path}: top level must be a mapping of sections, got {_yaml_kind(data)}",
            "start the file with section keys such as `sip:` and `api:`",
        )
    lines: dict[str, int] = {}
    warnings: list[str] = []
    _index_lines(node, "", lines, warnings, path)
    return {str(k): v for k, v in data.items()}, lines, warnings


def _yaml_kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _index_lines(
    node: yaml.Node, prefix: str, lines: dict[str, int], warnings: list[str], path: Path
) -> None:
    """Record the line of every mapping key, and warn on duplicate keys (YAML keeps the last)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if key in lines:
            warnings.append(
                f"{path} line {line}: duplicate key `{key}` (first at line {lines[key]}); "
                "the last one wins"
            )
        lines[key] = line
        _index_lines(value_node, f"{key}.", lines, warnings, path)


def _read_dotenv(path: Path | None) -> dict[str, str]:
    """Read ``.env`` for attribution; pydantic-settings reads it again to apply it."""
    if path is None:
        return {}
    try:
        return {k: v for k, v in dotenv_values(path).items() if v is not None}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single("", f"cannot read {path}: {exc}",
                                 "check the file permissions and that it is UTF-8 text") from None


# --------------------------------------------------------------------------
# where values came from
# --------------------------------------------------------------------------


class _Origins:
    """Answers "where did the value for key X come from?" for messages and describe_sources."""

    def __init__(
        self,
        environ: Mapping[str, str],
        dotenv: Mapping[str, str],
        dotenv_path: Path | None,
        config_file: Path | None,
        lines: Mapping[str, int],
    ) -> None:
        prefix = ENV_PREFIX.lower()
        # Empty values are ignored by the settings sources, so ignore them here too.
        self.env = _prefixed(environ, prefix)
        self.dotenv = _prefixed(dotenv, prefix)
        self.dotenv_path = dotenv_path
        self.config_file = config_file
        self.lines = lines

    def of(self, key: str) -> str | None:
        """Source label for dotted ``key`` (or a parent section set as JSON), if not default."""
        parts = key.split(".") if key else []
        # The most specific variable wins; a section-level JSON variable covers its children.
        for depth in range(len(parts), 0, -1):
            name = env_var_name(".".join(parts[:depth])).lower()
            if name in self.env:
                return self.env[name]
        for depth in range(len(parts), 0, -1):
            name = env_var_name(".".join(parts[:depth])).lower()
            if name in self.dotenv:
                return f"{self.dotenv[name]} in {self.dotenv_path}"
        if key in self.lines and self.config_file is not None:
            return f"{self.config_file.name} line {self.lines[key]}"
        return None

    def describe_all(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key in iter_leaf_keys(Settings):
            parts = key.split(".")
            env_hit = next((self.env[n] for d in range(len(parts), 0, -1)
                            if (n := env_var_name(".".join(parts[:d])).lower()) in self.env), None)
            dot_hit = next((self.dotenv[n] for d in range(len(parts), 0, -1)
                            if (n := env_var_name(".".join(parts[:d])).lower()) in self.dotenv),
                           None)
            if env_hit:
                out[key] = f"env ({env_hit})"
            elif dot_hit:
                out[key] = f".env ({dot_hit})"
            elif key in self.lines:
                out[key] = f"file ({self.config_file} line {self.lines[key]})"
            elif key in ("database.url", "sip.realm"):
                out[key] = "derived"
            else:
                out[key] = "default"
        return out

    def unknown_env_warnings(self) -> list[str]:
        """Warn about ``PBX_*`` variables that match no section (they are otherwise ignored)."""
        known = {env_var_name(k).lower() for k in iter_leaf_keys(Settings)}
        sections = {ENV_PREFIX.lower() + name for name in Settings.model_fields}
        warnings: list[str] = []
        for lowered, original in sorted(self.env.items()):
            if lowered == CONFIG_ENV_VAR.lower() or lowered in known or lowered in sections:
                continue
            head = lowered.split(ENV_DELIMITER, 1)[0]
            if head in sections:
                continue  # PBX_SIP__PROT: reported as an error by validation
            close = difflib.get_close_matches(lowered, sorted(known), n=1, cutoff=0.7)
            hint = f" (did you mean {close[0].upper()}?)" if close else ""
            warnings.append(f"environment variable {original} matches no setting and is "
                            f"ignored{hint}")
        return warnings


def _prefixed(environ: Mapping[str, str], prefix: str) -> dict[str, str]:
    """Lower-cased name -> original name for non-empty variables starting with ``prefix``."""
    return {k.lower(): k for k, v in environ.items() if k.lower().startswith(prefix) and v}


def _is_set(settings: Settings, key: str) -> bool:
    node: Any = settings
    for part in key.split(".")[:-1]:
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return key.rsplit(".", 1)[-1] in node.model_fields_set


# --------------------------------------------------------------------------
# turning pydantic errors into ConfigIssues
# --------------------------------------------------------------------------

_EXPECTED: Final[dict[str, str]] = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer (no fraction)",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "path_type": "a file system path",
    "model_type": "a mapping (a section with indented keys)",
    "model_attributes_type": "a mapping (a section with indented keys)",
    "dict_type": "a mapping (a section with indented keys)",
}


def _issues_from_validation(exc: ValidationError, origin: _Origins) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        issue = _issue_from_error(err, origin)
        if (issue.key, issue.message) not in seen:
            seen.add((issue.key, issue.message))
            issues.append(issue)
    return issues


def _issue_from_error(err: ErrorDetails, origin: _Origins) -> ConfigIssue:
    loc = [str(part) for part in err["loc"]]
    ctx = err.get("ctx") or {}
    kind = err["type"]
    key = ".".join(loc)

    if kind == "extra_forbidden":
        return ConfigIssue(key, f"unknown key `{key}`", _suggest(loc), origin.of(key))

    if kind == "pbx_rule":
        key = str(ctx.get("key") or key)
        return ConfigIssue(key, str(ctx.get("message", err["msg"])), str(ctx.get("fix", "")),
                           origin.of(key))

    shown = _show_input(key, err.get("input"))
    if kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {shown}"
    elif kind in ("literal_error", "enum"):
        message = f"expected one of {ctx.get('expected', '?')}, got {shown}"
    else:
        message = f"{_lower_first(err['msg'])}, got {shown}"
    fix = _field_fix(loc) or f"use {_EXPECTED.get(kind, 'a valid value')}"
    return ConfigIssue(key, message, fix, origin.of(key))


def _issue_from_settings_error(exc: SettingsError) -> ConfigIssue:
    # Raised e.g. when PBX_SIP='{not json' cannot be decoded as a section.
    text = str(exc)
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else ""
    name = env_var_name(field) if field else "a PBX_* variable"
    return ConfigIssue(
        field, f"cannot parse the value of {name} (a whole section must be JSON)",
        f"set individual keys instead, e.g. {env_var_name(field or 'sip')}{ENV_DELIMITER}PORT=5060",
        name if field else None,
    )


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _show_input(key: str, value: Any) -> str:
    """Render an offending value for humans: scalars only, secrets masked."""
    if is_secret_key(key):
        return MASK
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        text = mask_url_password(value)
        return repr(text if len(text) <= 60 else text[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _model_at(loc: Sequence[str]) -> type[BaseModel] | None:
    """The section model reached by following ``loc`` from :class:`Settings`."""
    model: type[BaseModel] = Settings
    for part in loc:
        info = model.model_fields.get(part)
        ann = info.annotation if info is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _field_fix(loc: Sequence[str]) -> str | None:
    """The ``fix`` hint declared on the field at ``loc``."""
    parent = _model_at(loc[:-1])
    if parent is None or not loc:
        return None
    info = parent.model_fields.get(loc[-1])
    extra = info.json_schema_extra if info is not None else None
    if isinstance(extra, dict) and isinstance(extra.get("fix"), str):
        return str(extra["fix"])
    return None


def _suggest(loc: Sequence[str]) -> str:
    """Fix text for an unknown key: the closest valid key, and the valid choices."""
    parent_loc, name = list(loc[:-1]), loc[-1]
    parent = _model_at(parent_loc)
    if parent is None:
        return "remove this key"
    choices = list(parent.model_fields)
    prefix = ".".join(parent_loc) + "." if parent_loc else ""
    where = f"under `{prefix[:-1]}`" if prefix else "at the top level"
    # Keys of other sections (siblings were already offered via `choices`).
    leaves = [leaf for leaf in iter_leaf_keys(Settings)
              if leaf.rpartition(".")[0] != ".".join(parent_loc)]
    by_name: dict[str, str] = {}
    for leaf in leaves:
        by_name.setdefault(leaf.rsplit(".", 1)[-1], leaf)
    lowered = name.lower()
    # 1. the exact key exists in another section (e.g. `max_calls:` at the top level);
    # 2. a near-miss of a key in this section (`prot` -> `port`);
    # 3. a near-miss of a key in another section.
    if lowered in by_name:
        guess: str | None = by_name[lowered]
    else:
        close = difflib.get_close_matches(lowered, choices, n=1, cutoff=0.6)
        if close:
            guess = f"{prefix}{close[0]}"
        else:
            near = difflib.get_close_matches(lowered, list(by_name), n=1, cutoff=0.75)
            guess = by_name[near[0]] if near else None
    if guess:
        return f"did you mean `{guess}`? valid keys {where}: {_join(choices)}"
    return f"remove it or use one of the valid keys {where}: {_join(choices)}"


def _join(items: Iterable[str]) -> str:
    return ", ".join(items)
