"""fabstack tasks: `fab --list` shows them; `fab -H HOST provision` provisions a server."""

from tasks import build_namespace

ns = build_namespace()
