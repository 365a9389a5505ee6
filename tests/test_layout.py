"""The host's layout is spelled once, in tasks/layout.py: no task or template spells the app's
folders itself (their docstrings and comments may name them, as /opt/APP)."""

import ast
import re
from pathlib import Path

from tasks import settings as settings_mod
from tasks.layout import Layout
from tasks.primitives import FILES_DIR, render
from tests.conftest import VALID

ROOT = Path(__file__).resolve().parent.parent
# a folder of the app (``/opt/APP`` in prose is the placeholder, not a path)
APP_FOLDERS = re.compile(r"/opt/(?!APP)|/var/opt/(?!APP)|/var/log/\{|/usr/local/sbin/\{")


def code_strings(path: Path):
    """(line, text) of every string literal of ``path`` that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_task_spells_the_app_folders():
    found = [f"{path.name}:{line}: {text!r}" for path in sorted((ROOT / "tasks").glob("*.py"))
             if path.name not in ("layout.py", "sandbox.py", "pebble.py")
             for line, text in code_strings(path) if APP_FOLDERS.search(text)]
    assert not found, "\n".join(found)


def test_no_template_spells_the_app_folders():
    found = [f"{path.name}:{n}: {line}" for path in sorted(Path(FILES_DIR).glob("*.j2"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if not line.lstrip().startswith(("#", "{#")) and re.search(r"/opt/|/var/opt/", line)]
    assert not found, "\n".join(found)


def test_the_layout_follows_app_name_into_the_files():
    s = settings_mod.parse({**VALID, "APP_NAME": "shop"})
    assert s.layout == Layout.of("shop")
    assert s.layout.current == "/opt/shop/app" and s.layout.media == "/var/opt/shop/media"
    unit = render("gunicorn.service.j2", s)
    assert "WorkingDirectory=/opt/shop/instances/%i\n" in unit and "ratemyderp" not in unit
