"""The templates' compiled-code cache: used when it can be, never in the way."""

import jinja2

from tasks.primitives import templates


def environment(cache) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.DictLoader({"t.j2": "{{ x }}!"}),
                              bytecode_cache=cache)


def test_a_compiled_template_is_kept_and_used_by_the_next_run(tmp_path):
    cache = templates._BytecodeCache(str(tmp_path))
    assert environment(cache).get_template("t.j2").render(x=1) == "1!"
    assert len(list(tmp_path.iterdir())) == 1
    assert environment(cache).get_template("t.j2").render(x=2) == "2!"


def test_a_cache_that_cannot_be_written_is_no_cache(tmp_path):
    cache = templates._BytecodeCache(str(tmp_path / "gone"))
    assert environment(cache).get_template("t.j2").render(x=1) == "1!"
    assert not (tmp_path / "gone").exists()


def test_without_a_temporary_folder_there_is_no_cache(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "none"))
    assert templates._bytecode_cache() is None
