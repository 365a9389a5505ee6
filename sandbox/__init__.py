"""The sandbox: a throwaway Debian host on this machine for the demo, the tests and the bench.

Nothing here goes to a server (that is ``tasks``); this package boots the host fabstack is
tried on and stands in for the services it would use there:

- ``sandbox.container``: the Debian image, the systemd-nspawn container in its own network
  namespace, its proxy (:class:`~sandbox.container.Sandbox`);
- ``sandbox.cluster``: several sandboxes on one bridge with one proxy
  (:class:`~sandbox.cluster.Cluster`), for multi-host trials;
- ``sandbox.pebble``: a local ACME CA (Pebble) that issues the sandbox's certificates;
- ``sandbox.tasks``: ``fab sandbox.up|down|status|demo``, ``fab sandbox.cluster-up|down|status``
  and the settings files they write.
"""
