"""fabstack tasks: `fab --list` shows them; `fab -H HOST provision` provisions a server."""

from invoke import Collection

import sandbox.tasks
from tasks import build_namespace

ns = build_namespace()
ns.add_collection(Collection.from_module(sandbox.tasks, name="sandbox"))
