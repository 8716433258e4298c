"""studio serve / app.py address: Gradio's GRADIO_SERVER_NAME/GRADIO_SERVER_PORT, then STUDIO_HOST/STUDIO_PORT,
then 127.0.0.1:7860; a bad port is one line. No server is started: launch is stubbed."""
import pytest

from studio.cli import main

ENV = ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "STUDIO_HOST", "STUDIO_PORT")


@pytest.fixture
def launched(monkeypatch):
    """Clears the address variables and replaces studio.ui.launch; returns the arguments it got."""
    import studio.ui

    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(studio.ui, "launch", lambda **kwargs: seen.append(kwargs))
    return seen


def serve(launched, *argv):
    assert main(["serve", *argv]) == 0
    return launched[-1]["host"], launched[-1]["port"]


def test_defaults_are_this_machine_only(launched):
    assert serve(launched) == ("127.0.0.1", 7860)


def test_gradio_variables_set_the_address_and_win_over_the_studio_ones(launched, monkeypatch):
    monkeypatch.setenv("STUDIO_HOST", "10.0.0.1")
    monkeypatch.setenv("STUDIO_PORT", "8000")
    assert serve(launched) == ("10.0.0.1", 8000)  # the older names still work
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    assert serve(launched, "--auth", "a:b") == ("0.0.0.0", 7861)
    assert serve(launched, "--host", "127.0.0.1", "--port", "9000") == ("127.0.0.1", 9000)  # flags win


@pytest.mark.parametrize("env, argv, message", [
    ({"GRADIO_SERVER_PORT": "abc"}, [], "GRADIO_SERVER_PORT must be a port number from 1 to 65535, got 'abc'"),
    ({"GRADIO_SERVER_PORT": "70000", "STUDIO_PORT": "8000"}, [], "GRADIO_SERVER_PORT must be a port number"),
    ({"STUDIO_PORT": "-1"}, [], "STUDIO_PORT must be a port number"),
    ({}, ["--port", "0"], "--port must be a port number"),
])
def test_a_bad_port_is_one_line(launched, monkeypatch, capsys, env, argv, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert launched == []


def test_a_bad_port_variable_breaks_no_other_command(launched, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "abc")
    monkeypatch.setenv("STUDIO_PORT", "abc")
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
