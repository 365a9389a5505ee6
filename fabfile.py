"""fabstack tasks: `fab --list` shows them; `fab -H HOST provision` provisions a server."""

from fabric.main import program

from tasks import build_namespace
from tasks.manage import Executor

ns = build_namespace()
# `fab manage -- ARGS`: the words after -- are manage.py's, not a command of their own (Invoke
# reads an executor class from the config only after the collection's config is set aside).
program.executor_class = Executor
