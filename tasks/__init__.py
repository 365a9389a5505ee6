"""fabstack: Fabric tasks that take a bare Debian/Ubuntu server to a running Django + Celery site.

The namespace is one collection per concern (``provision``, ``python``, ...);
defaults live in the ``fabstack`` config section and can be overridden in
``fabric.yaml`` or with ``FABRIC_FABSTACK_*`` environment variables:

- ``env_file``: the settings file to read (default ``.env``);
- ``check``: plan only, change nothing (the same as each task's ``--check``);
- ``command_timeout``, ``probe_timeout``: seconds a command that changes the host, or one
  that reads its state, may run before it is stopped and its step fails (1800, 300);
- ``hosts``: the inventory, the hosts fab acts on without ``-H`` (tasks/inventory.py).
"""

from invoke import Collection

from . import (
    backup,
    celery,
    certbot,
    db,
    deploy,
    logs,
    maintenance,
    manage,
    media,
    monitoring,
    nginx,
    provision,
    python,
    status,
    upgrade,
)
from .host import COMMAND_TIMEOUT, PROBE_TIMEOUT


def build_namespace() -> Collection:
    ns = Collection()
    for module in (provision, python, db, backup, celery, nginx, certbot, monitoring):
        ns.add_collection(Collection.from_module(module))
    for name in ("deploy", "rollback", "releases", "gunicorn"):
        ns.add_task(getattr(deploy, name))
    ns.add_task(status.status)
    for name in ("backup_db", "restore_db"):
        ns.add_task(getattr(backup, name))
    ns.add_task(manage.manage)
    ns.add_task(logs.logs)
    ns.add_task(maintenance.maintenance)
    ns.add_task(media.restore_media)
    ns.add_task(upgrade.upgrade)
    ns.configure({"fabstack": {"env_file": ".env", "check": False,
                               "command_timeout": COMMAND_TIMEOUT,
                               "probe_timeout": PROBE_TIMEOUT}})
    return ns
