"""Settings: every bad key is named at once, before any connection."""

from pathlib import Path

import pytest

from tasks import settings as settings_mod

ROOT = Path(__file__).resolve().parent.parent
GOOD = ("DOMAIN=example.com\nADMIN_EMAIL=ops@example.com\nDB_PASSWORD=settings-test-password\n"
        "DJANGO_SECRET_KEY=" + "settings-test-secret-key-" * 2 + "\n")


def write(tmp_path, text):
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_example_file_lists_every_key_and_nothing_else():
    names = {line.split("=", 1)[0] for line in (ROOT / "conf.example.env").read_text().splitlines()
             if line and not line.startswith("#")}
    assert names == {key.name for key in settings_mod.KEYS}


def test_example_file_as_is_fails_on_its_placeholders(tmp_path):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(ROOT / "conf.example.env")
    assert "DOMAIN: still the placeholder" in str(err.value)
    assert "ADMIN_EMAIL: still the placeholder" in str(err.value)


def test_missing_keys_are_all_named(tmp_path):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, "APP_NAME=shop\n"))
    assert "DOMAIN: missing" in str(err.value) and "ADMIN_EMAIL: missing" in str(err.value)
    assert "DB_PASSWORD: missing" in str(err.value)
    assert "4 problems" in str(err.value)


@pytest.mark.parametrize("line, key", [
    ("DOMAIN=not a domain", "DOMAIN"),
    ("DOMAIN=-bad-.com", "DOMAIN"),
    ("DOMAIN=localhost", "DOMAIN"),
    ("ADMIN_EMAIL=ops-at-example.com", "ADMIN_EMAIL"),
    ("APP_NAME=My App", "APP_NAME"),
    ("APP_NAME=UPPER", "APP_NAME"),
    ("APP_NAME=" + "a" * 40, "APP_NAME"),
    ("PYTHON_VERSION=2.7", "PYTHON_VERSION"),
    ("HTTP_PROXY=proxy:3128", "HTTP_PROXY"),
    ("EXTRA_CA_CERT=/nonexistent/ca.pem", "EXTRA_CA_CERT"),
    ("APT_CACHE_MAX_AGE=soon", "APT_CACHE_MAX_AGE"),
])
def test_malformed_values_are_named(tmp_path, line, key):
    text = GOOD + line + "\n"
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, text))
    assert f"{key}:" in str(err.value)


@pytest.mark.parametrize("value, fault", [
    ("my app", "'my app' has spaces"),
    ("RateMyDerp", "'RateMyDerp' has uppercase letters"),
    ("a" * 32, "is 32 characters long"),
    ("1shop", "does not start with a letter"),
    ("shop.app", "has other characters than a-z, 0-9, '-' and '_'"),
    ("", "APP_NAME: is empty"),
])
def test_bad_app_name_says_what_is_wrong(tmp_path, value, fault):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + f"APP_NAME={value}\n"))
    assert fault in str(err.value)


def test_app_name_of_31_characters_is_accepted(tmp_path):
    assert settings_mod.load(write(tmp_path, GOOD + "APP_NAME=" + "a" * 31 + "\n")).app == "a" * 31


def test_defaults_and_derived_paths(tmp_path):
    s = settings_mod.load(write(tmp_path, GOOD))
    assert s.app == "ratemyderp"
    assert s.layout.conf == "/opt/ratemyderp/conf" and s.layout.media == "/var/opt/ratemyderp/media"
    s = settings_mod.load(write(tmp_path, "APP_NAME=shop\n" + GOOD))
    assert s.layout.venv == "/opt/shop/venv" and s.layout.logs == "/var/log/shop"


def test_values_are_taken_literally(tmp_path):
    s = settings_mod.load(write(tmp_path, GOOD + "APP_ENV_GREETING='git $HOME #x'\n"))
    assert s.extras["GREETING"] == "git $HOME #x"


def test_missing_file_says_how_to_start(tmp_path):
    with pytest.raises(settings_mod.SettingsError, match="copy conf.example.env"):
        settings_mod.load(tmp_path / "nope.env")


# -- nothing a setting names may take over or break what is not ours --------------------------

@pytest.mark.parametrize("line, named", [
    ("APP_NAME=root", "APP_NAME: 'root' is reserved"),
    ("APP_NAME=postgres", "APP_NAME: 'postgres' is reserved"),
    ("APP_NAME=www-data", "APP_NAME: 'www-data' is reserved"),
    ("APP_NAME=systemd-network", "APP_NAME: 'systemd-network' is reserved"),
    ("APP_NAME=celery", "APP_NAME: 'celery' is reserved"),
    ("APP_NAME=backups", "APP_NAME: 'backups' is reserved"),
    ("APP_NAME=pg_app", "APP_NAME: 'pg_app' is reserved"),
    ("DB_USER=postgres", "DB_USER: 'postgres' is PostgreSQL's own"),
    ("DB_USER=pg_monitor", "DB_USER: 'pg_monitor' is PostgreSQL's own"),
    ("MONITORING_DB_USER=postgres", "MONITORING_DB_USER: 'postgres' is PostgreSQL's own"),
    ("DB_NAME=template1", "DB_NAME: 'template1' is PostgreSQL's own database"),
    ("DB_NAME=postgres", "DB_NAME: 'postgres' is PostgreSQL's own database"),
])
def test_reserved_names_are_refused(tmp_path, line, named):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + line + "\n"))
    assert named in str(err.value)


@pytest.mark.parametrize("line, named", [
    ('HTTP_PROXY="http://proxy:3128\nAcquire::x \\"y\\";"',
     "HTTP_PROXY: holds a control character"),
    ('HTTP_PROXY="http://pro\\"xy:3128"', "HTTP_PROXY: must be a http:// or https:// URL without"),
    ("HTTP_PROXY='http://proxy :3128'", "HTTP_PROXY: must be a http:// or https:// URL without"),
    ("HTTP_PROXY=http://proxy:31x8", "HTTP_PROXY: is not a URL that can be parsed"),
    ("HTTP_PROXY=http://proxy:99999", "HTTP_PROXY: is not a URL that can be parsed"),
    ("HTTP_PROXY=http://[::1", "HTTP_PROXY: is not a URL that can be parsed"),
    ("HTTP_PROXY=http://pro%xy/", "HTTP_PROXY: has a host name that cannot be parsed"),
    ("INFLUX_URL=https://influx:86\\\\86", "INFLUX_URL: must be a http:// or https:// URL"),
    ("ACME_SERVER=http://acme.example/dir", "ACME_SERVER: must be a https:// URL"),
    ("ACME_SERVER=https://acme:0x/dir", "ACME_SERVER: is not a URL that can be parsed"),
    ("DEPLOY_REPO='https://git.example.com/a b.git'", "DEPLOY_REPO: must be a https://"),
    ("DEPLOY_REPO=https://git.example.com:ssh/app.git", "DEPLOY_REPO: is not a URL that can"),
    ("DEPLOY_REPO=git@github.com:org/'app.git", "DEPLOY_REPO: must be user@host:path"),
    ("DEPLOY_REPO=ssh://git:pw@git.example.com/app.git", "DEPLOY_REPO: must not hold a password"),
    ("DEPLOY_REF='main; rm -rf /'", "DEPLOY_REF: must be a git ref"),
    ("DEPLOY_REF=-n", "DEPLOY_REF: must be a git ref"),
    ("DEPLOY_REF=a..b", "DEPLOY_REF: must be a git ref"),
    ("DEPLOY_SUBDIR=../etc", "DEPLOY_SUBDIR: must be a folder of the repository"),
    ("DEPLOY_SUBDIR='app\"x'", "DEPLOY_SUBDIR: must be a folder of the repository"),
    ("BASE_PACKAGES=git -oAPT::x=y", "BASE_PACKAGES: '-oAPT::x=y': not Debian package names"),
    ('INFLUX_ORG="my \\"org\\""', "INFLUX_ORG: must not hold quotes or backslashes"),
    ("INFLUX_BUCKET='a\tb'", "INFLUX_BUCKET: holds a control character"),
    ("DJANGO_ADMIN_URL='admin\r/'", "DJANGO_ADMIN_URL: holds a control character"),
    ("ADMIN_EMAIL=o'ps@example.com", "ADMIN_EMAIL: must be an e-mail address"),
])
def test_values_that_would_break_their_file_are_refused(tmp_path, line, named):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + line + "\n"))
    assert named in str(err.value)


@pytest.mark.parametrize("value", ["http://10.0.0.1:3128", "https://u:p%40ss@proxy.example:8080/",
                                   "http://[fd00::1]:3128", ""])
def test_good_proxy_urls_pass(tmp_path, value):
    assert settings_mod.load(write(tmp_path, GOOD + f"HTTP_PROXY={value}\n"))["HTTP_PROXY"] == value


@pytest.mark.parametrize("value", ["https://github.com/org/app.git", "git@github.com:org/app.git",
                                   "ssh://git@git.example.com:2222/org/app.git", "/srv/app",
                                   "~/src/app", ""])
def test_good_deploy_repos_pass(tmp_path, value):
    s = settings_mod.load(write(tmp_path, GOOD + f"DEPLOY_REPO={value}\n"))
    assert s["DEPLOY_REPO"] == value


def test_a_key_set_twice_names_both_lines(tmp_path):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + "# again\nDOMAIN=example.org\n"))
    assert "DOMAIN: is set twice: lines 1 and 6" in str(err.value)


def test_a_line_that_is_not_key_value_is_named(tmp_path):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + "APP_NAME='shop\n"))
    assert "line 5: cannot be read as KEY=value" in str(err.value)


def test_credentials_in_urls_are_secrets(tmp_path):
    s = settings_mod.load(write(tmp_path, GOOD + "HTTP_PROXY=http://ops:pr%40xy-pw@10.0.0.1:3128\n"
                                "DEPLOY_REPO=https://ghp_token1234@github.com/org/app.git\n"
                                "INFLUX_URL=https://influx.example:8086\n"))
    assert {"http://ops:pr%40xy-pw@10.0.0.1:3128", "pr%40xy-pw", "pr@xy-pw",
            "https://ghp_token1234@github.com/org/app.git", "ghp_token1234"} <= set(s.secrets)
    assert "https://influx.example:8086" not in s.secrets and "ops" not in s.secrets
    plain = settings_mod.load(write(tmp_path, GOOD + "DEPLOY_REPO=git@github.com:org/app.git\n"))
    assert "git@github.com:org/app.git" not in plain.secrets and "git" not in plain.secrets


def test_extras_are_secret_by_name_value_or_mark(tmp_path):
    s = settings_mod.load(write(tmp_path, GOOD + "APP_ENV_DJANGO_DEBUG=False\n"
                                "APP_ENV_STRIPE_API_KEY=sk_live_abc\nAPP_ENV_SENTRY_DSN=dsn-value\n"
                                "APP_ENV_DB_PASSWD=pw-value\nAPP_ENV_UPSTREAM=https://u:pw1234@x.example/\n"
                                "APP_SECRET_ENV_LICENCE=lic-value\nAPP_ENV_GREETING=hello-world\n"))
    assert s.extras["DJANGO_DEBUG"] == "False" and s.extras["LICENCE"] == "lic-value"
    assert {"sk_live_abc", "dsn-value", "pw-value", "pw1234", "lic-value"} <= set(s.secrets)
    assert "False" not in s.secrets and "hello-world" not in s.secrets


def test_an_extra_set_with_both_prefixes_is_refused(tmp_path):
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + "APP_ENV_X=1\nAPP_SECRET_ENV_X=2\n"))
    assert "APP_SECRET_ENV_X: X is set by APP_ENV_X too" in str(err.value)


def test_files_copied_to_the_host_must_hold_what_they_are_for(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "key").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    with pytest.raises(settings_mod.SettingsError) as err:
        settings_mod.load(write(tmp_path, GOOD + f"EXTRA_CA_CERT={tmp_path}/ca.pem\n"
                                f"DEPLOY_KEY={tmp_path}/key\n"))
    assert f"EXTRA_CA_CERT: must name a PEM file with a CERTIFICATE block: {tmp_path}/ca.pem" \
        in str(err.value)
    assert "DEPLOY_KEY: must name a PEM file with a PRIVATE KEY block" in str(err.value)
    (tmp_path / "key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")
    s = settings_mod.load(write(tmp_path, GOOD + f"DEPLOY_KEY={tmp_path}/key\n"))
    assert s["DEPLOY_KEY"] == f"{tmp_path}/key"
