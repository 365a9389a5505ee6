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
    assert s.conf_dir == "/opt/ratemyderp/conf" and s.media_dir == "/var/opt/ratemyderp/media"
    s = settings_mod.load(write(tmp_path, "APP_NAME=shop\n" + GOOD))
    assert s.venv_dir == "/opt/shop/venv" and s.log_dir == "/var/log/shop"


def test_values_are_taken_literally(tmp_path):
    s = settings_mod.load(write(tmp_path, GOOD + "BASE_PACKAGES='git $HOME #x'\n"))
    assert s["BASE_PACKAGES"] == "git $HOME #x"


def test_missing_file_says_how_to_start(tmp_path):
    with pytest.raises(settings_mod.SettingsError, match="copy conf.example.env"):
        settings_mod.load(tmp_path / "nope.env")
