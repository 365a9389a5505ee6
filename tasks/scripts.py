"""Shell programs the tasks run on a host, from the templates ``files/*.sh.j2``.

A program's values from the settings are rendered into it, each quoted with the ``q`` filter
(``{{ layout.venv | q }}``). The values of one run (a release id, a timeout...) are not
rendered: :func:`script` sets them as shell variables in lines before the program, quoted, and
the program names each one at its top (``: "${release:?}"``); a list (units...) becomes its
arguments (``"$@"``). So every template renders with the settings alone (the check before a
run, and shellcheck in tests/test_shell.py).
"""

from __future__ import annotations

from .primitives import q, render


def script(name: str, settings, *args: str, **values) -> str:
    """``files/<name>`` rendered, after one ``name='value'`` line per keyword of ``values``
    and a ``set -- ARGS`` line when ``args`` are given."""
    return ("".join(f"{key}={q(str(value))}\n" for key, value in values.items())
            + (f"set -- {' '.join(q(a) for a in args)}\n" if args else "")
            + render(name, settings))
