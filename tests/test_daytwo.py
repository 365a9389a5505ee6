"""Day-two tasks' logic over the fake connection and as pure functions (issue 14)."""

import io

import pytest

from tasks import manage
from tasks.host import Result, StepFailed


def test_remainder_from_fabs_arguments():
    argv = ["fab", "-H", "a", "manage", "--", "shell", "-c", "x = 1; print(x)", "--", "-H"]
    assert manage.remainder(argv) == ["shell", "-c", "x = 1; print(x)", "--", "-H"]
    assert manage.remainder(["fab", "manage"]) == []


def test_only_superuser_variables_are_passed_on():
    env = {"DJANGO_SUPERUSER_PASSWORD": "p", "DJANGO_SUPERUSER_USERNAME": "u",
           "DJANGO_SECRET_KEY": "k", "HOME": "/root", "DJANGO_SUPERUSER_bad-name": "x"}
    assert manage.forwarded(env) == {"DJANGO_SUPERUSER_PASSWORD": "p",
                                     "DJANGO_SUPERUSER_USERNAME": "u"}


def test_runner_script_quotes_arguments_and_holds_no_values(settings):
    script = manage.runner_script(settings, ["shell", "-c", "print('a b'); $(id)"], False)
    assert "manage.py shell -c 'print('\"'\"'a b'\"'\"'); $(id)' </dev/null" in script
    assert f". /opt/{settings.app}/conf/{settings.app}.conf" in script
    assert f"runuser -u {settings.app} -- /opt/{settings.app}/venv/bin/python" in script
    assert settings["DJANGO_SECRET_KEY"] not in script
    assert "</dev/null" not in manage.runner_script(settings, ["shell"], True)


def test_stage_writes_variables_on_stdin_only(make_host):
    h, _ = make_host()
    scripts = []
    h._exec = lambda command, script: scripts.append(script) or Result("/root/.f1\n", "", 0)
    command = manage.stage(h, ["createsuperuser"], {"DJANGO_SUPERUSER_PASSWORD": "s3cr3t pw"},
                           False)
    assert "s3cr3t" not in command and "/root/.f1" in command
    assert "DJANGO_SUPERUSER_PASSWORD='s3cr3t pw'" in scripts[-1]


def test_stage_refuses_a_host_without_a_release(make_host):
    h, _ = make_host()
    h._exec = lambda command, script: Result("", "no release deployed: /opt/x/app/manage.py "
                                             "is missing", 3)
    with pytest.raises(StepFailed, match="no release deployed"):
        manage.stage(h, ["check"], {}, False)


def test_streamed_output_is_masked_line_by_line():
    out = io.StringIO()
    lines = manage.MaskedLines(lambda t: t.replace("topsecret", "********"), out, ["pw-extra"])
    for chunk in ("a top", "secret b\nc pw-ex", "tra d\n", "tail"):
        lines.write(chunk)
    assert out.getvalue() == "a ******** b\nc ******** d\n"
    lines.flush()
    assert out.getvalue().endswith("tail")

