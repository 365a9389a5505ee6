"""Templates: ``files/*.j2`` rendered with the settings (Jinja2, strict undefined)."""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

FILES_DIR = Path(__file__).resolve().parent.parent.parent / "files"


class TemplateError(Exception):
    """A template in files/ cannot be rendered; the message names the file (and the line, for
    a syntax error)."""


def toml_quote(value: str) -> str:
    """``value`` as a TOML basic string: double-quoted, ``"``, ``\\`` and controls escaped."""
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def conninfo_quote(value: str) -> str:
    """``value`` as one libpq connection-string value: single-quoted, ``\\`` and ``'`` escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def env_quote(value: str) -> str:
    """``value`` as one double-quoted word that systemd's EnvironmentFile= and sh read alike.

    Inside double quotes both readers take a backslash before ``\\ " $ ` `` as an escape and
    keep every other character (newlines, ``'``, ``#``, ``=``, spaces) as it is.
    """
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in value) + '"'


class _BytecodeCache(jinja2.FileSystemBytecodeCache):
    """Compiled templates kept between runs, in Jinja's folder of the temporary one (the
    user's only; a template whose source changed is compiled again): compiling them all, as
    every fab run does before it touches a host (:func:`prerender`), takes about 0.15 s. A
    cache that cannot be written is no cache."""

    def dump_bytecode(self, bucket) -> None:
        try:
            super().dump_bytecode(bucket)
        except OSError:
            pass


def _bytecode_cache() -> _BytecodeCache | None:
    try:
        return _BytecodeCache()
    except (OSError, RuntimeError):  # no temporary folder, or one another user owns
        return None


# The niceness of work that is not the site's serving (fab's commands on the host: tasks/host.py;
# Celery's units: background-unit.j2; the daily backup: backup.py.j2; a gunicorn instance that
# does not serve: app-instance.sh.j2), in templates as {{ background_nice }}. Debian's and
# Ubuntu's kernels group processes by session ("autogroups": each SSH session and each service
# is one), and a group weighs as much as any other whatever the niceness of its processes: so it
# is set on the group too (autogroup_nice). Where cgroups share the CPU instead, neither changes
# anything.
BACKGROUND_NICE = 10


def autogroup_nice(pid: str, nice: int | str) -> str:
    """The shell line that sets process ``pid``'s autogroup (its session's) to niceness ``nice``
    (both shell words: ``self``, ``"$2"``...), in templates as {{ autogroup_nice(pid, nice) }}.
    It says nothing and fails nothing where the kernel has no autogroups, nor where it refuses
    the change (another group's was set less than 0.1 s before, and the writer is not root)."""
    return f"{{ echo {nice} > /proc/{pid}/autogroup; }} 2>/dev/null"


_jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(str(FILES_DIR)),
                            undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                            autoescape=False, bytecode_cache=_bytecode_cache())
# Quoting for the file formats the templates write: {{ value | env_quote }}
# and {{ value | q }}: one shell word, quoted
_jinja.filters.update(env_quote=env_quote, toml_quote=toml_quote, conninfo_quote=conninfo_quote,
                      q=shlex.quote)
_jinja.globals.update(background_nice=BACKGROUND_NICE, autogroup_nice=autogroup_nice)


def render(name: str, settings, **extra) -> str:
    """Render ``files/<name>`` with the settings as ``s`` and ``env``, their ``layout`` (and
    ``extra``)."""
    try:
        return _jinja.get_template(name).render(s=settings, env=settings.values,
                                                layout=settings.layout, **extra)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"files/{exc.name or name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"files/{name}: {exc}") from None


def prerender(settings) -> None:
    """Render every template once so a broken one fails before any host is touched."""
    for name in _jinja.list_templates(filter_func=lambda n: n.endswith(".j2")):
        render(name, settings)
