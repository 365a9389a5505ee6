"""Templates: ``files/*.j2`` rendered with the settings (Jinja2, strict undefined)."""

from __future__ import annotations

from pathlib import Path

import jinja2

FILES_DIR = Path(__file__).resolve().parent.parent.parent / "files"


class TemplateError(Exception):
    """A template in files/ cannot be rendered; the message names file and line."""


_jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(str(FILES_DIR)),
                            undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                            autoescape=False)


def render(name: str, settings, **extra) -> str:
    """Render ``files/<name>`` with the settings as ``s`` and ``env`` (and ``extra``)."""
    try:
        return _jinja.get_template(name).render(s=settings, env=settings.values, **extra)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"files/{exc.name or name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"files/{name}: {exc}") from None


def prerender(settings) -> None:
    """Render every template once so a broken one fails before any host is touched."""
    for name in _jinja.list_templates(filter_func=lambda n: n.endswith(".j2")):
        render(name, settings)
