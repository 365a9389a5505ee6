"""Where the app lives on a host: every path fabstack makes for it, spelled once.

``Layout.of(app)`` (``settings.layout``) is what the tasks use and what every template in
files/ gets as ``layout``::

    /opt/APP/                 code: root-owned
        app -> releases/ID    current: the release serving
        releases/ID/          releases
        repo.git/             repo: the host's mirror of a remote DEPLOY_REPO
        instances/COLOR       instances: instances/blue, instances/green -> releases/ID,
                              the releases gunicorn's two instances APP@blue and APP@green
                              run (colors); each listens on app_socket(COLOR) in run
        venv -> venvs/KEY     venv: the current release's virtualenv (a link the switch
                              moves with app; a directory, the seed, before the first deploy)
        venvs/KEY/            venvs: one virtualenv per requirements.txt and interpreter;
                              releases/ID/.fabstack-venv (release_venv) names the release's;
                              venvs/legacy legacy_venv: the shared one of a host deployed
                              before (releases without .fabstack-venv run from it);
                              releases/ID/.fabstack-staticfiles.json (release_manifest):
                              the release's copy of its static files' manifest
        conf/                 conf: root:APP 0750; conf/APP.conf is env_file, conf/pgpass
                              pgpass (root's, for the app's database role), conf/deploy_key
                              deploy_key and conf/git-credentials git_credentials (DEPLOY_REPO's),
                              conf/gunicorn.conf.py gunicorn_conf (gunicorn's instances')
        backup/               backup: the dumps; backup/media/ media_snapshots
    /var/opt/APP/             home: the app user's home; static/ and media/ below it
                              (static/: the app's, collectstatic runs as its user)
    /var/log/APP/             logs
    /usr/local/sbin/APP-backup  backup_script
    /run/APP/COLOR/gunicorn.sock        app_socket(COLOR): instance COLOR's socket (run: /run/APP)
    /etc/nginx/conf.d/fabstack-APP-upstream.conf  upstream: NGINX's upstream APP_live, the
                                        instance that serves
    /etc/nginx/conf.d/fabstack-APP-web.conf  web_upstream: the lb's upstream APP_web, the
                                        web hosts (on an lb host of its own)
    /etc/systemd/system-generators/fabstack-APP  boot_generator: the one that starts at boot
    /var/www/fabstack-maintenance/APP/  maintenance: the maintenance page while it is on
    /var/lib/backups                    backups_home (the backups account's, its .pgpass)
    /run/celery, /var/log/celery, /var/lib/celery  celery_run, celery_logs, celery_home
                                        (Celery's, whatever the app)
"""

from __future__ import annotations

from dataclasses import dataclass

CELERY_RUN = "/run/celery"  # Celery's, whatever the app
CELERY_LOGS = "/var/log/celery"
CELERY_HOME = "/var/lib/celery"
BACKUPS_HOME = "/var/lib/backups"  # the backups account's, whatever the app
RELEASE_VENV = ".fabstack-venv"  # in a release: the link to its virtualenv in venvs/
COLORS = ("blue", "green")  # gunicorn's two instances
GENERATORS = "/etc/systemd/system-generators"  # systemd's, for the local administrator
# in a release: the manifest (staticfiles.json) its collectstatic wrote in the static folder
RELEASE_MANIFEST = ".fabstack-staticfiles.json"


@dataclass(frozen=True)
class Layout:
    """The paths of app ``app`` on a host (see the module's docstring)."""

    app: str
    code: str
    current: str
    releases: str
    instances: str
    repo: str
    venv: str
    venvs: str
    legacy_venv: str
    conf: str
    env_file: str
    gunicorn_conf: str
    pgpass: str
    deploy_key: str
    git_credentials: str
    backup: str
    media_snapshots: str
    home: str
    static: str
    media: str
    logs: str
    backup_script: str
    maintenance: str
    run: str
    upstream: str
    web_upstream: str
    boot_generator: str
    celery_run: str = CELERY_RUN
    celery_logs: str = CELERY_LOGS
    celery_home: str = CELERY_HOME
    backups_home: str = BACKUPS_HOME
    release_venv: str = RELEASE_VENV
    colors: tuple[str, ...] = COLORS
    release_manifest: str = RELEASE_MANIFEST

    @classmethod
    def of(cls, app: str) -> Layout:
        code, home = f"/opt/{app}", f"/var/opt/{app}"
        conf, backup = f"{code}/conf", f"{code}/backup"
        return cls(app=app, code=code, current=f"{code}/app", releases=f"{code}/releases",
                   instances=f"{code}/instances", repo=f"{code}/repo.git", venv=f"{code}/venv",
                   venvs=f"{code}/venvs", legacy_venv=f"{code}/venvs/legacy", conf=conf,
                   env_file=f"{conf}/{app}.conf", gunicorn_conf=f"{conf}/gunicorn.conf.py",
                   pgpass=f"{conf}/pgpass",
                   deploy_key=f"{conf}/deploy_key", git_credentials=f"{conf}/git-credentials",
                   backup=backup, media_snapshots=f"{backup}/media", home=home,
                   static=f"{home}/static", media=f"{home}/media", logs=f"/var/log/{app}",
                   backup_script=f"/usr/local/sbin/{app}-backup",
                   maintenance=f"/var/www/fabstack-maintenance/{app}", run=f"/run/{app}",
                   upstream=f"/etc/nginx/conf.d/fabstack-{app}-upstream.conf",
                   web_upstream=f"/etc/nginx/conf.d/fabstack-{app}-web.conf",
                   boot_generator=f"{GENERATORS}/fabstack-{app}")

    def release(self, release_id: str) -> str:
        """The folder of release ``release_id``."""
        return f"{self.releases}/{release_id}"

    def instance(self, color: str) -> str:
        """The link naming the release gunicorn's instance ``color`` runs."""
        return f"{self.instances}/{color}"

    def app_socket(self, color: str) -> str:
        """The socket gunicorn's instance ``color`` listens on."""
        return f"{self.run}/{color}/gunicorn.sock"
