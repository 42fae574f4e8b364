"""`kvforge serve`: options come from ServerConfig and the engine configs; bad ones fail before the
model loads."""

from __future__ import annotations

import pytest

from kvforge.cli import main


def test_serve_help_lists_server_and_engine_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--on-full", "--queue-timeout", "--max-queue", "--retry-after",
                 "--api-key", "--served-model-name", "--chat-template",
                 "--model", "--kv-cache-memory", "--num-blocks", "--max-num-seqs"):
        assert flag in out, flag


@pytest.mark.parametrize("argv, message", [
    (["--on-full", "drop"], "on_full must be one of reject, wait, shrink"),
    (["--port", "70000"], "port must be an integer in [0, 65535]"),
    (["--queue-timeout", "0"], "queue_timeout must be a finite number of seconds > 0"),
    (["--queue-timeout", "inf"], "queue_timeout must be a finite number of seconds > 0"),
    (["--admission", "greedy"], "admission must be one of need, reserve"),
    (["--max-queue", "-1"], "max_queue must be an integer >= 0"),
    (["--api-key", ""], "api_key must be a non-empty string"),
    (["--chat-template", "{% if %}"], "chat_template: the chat template does not compile"),
    (["--chat-template", "missing.jinja"], "is neither a file nor a Jinja template"),
])
def test_bad_server_options_are_reported_without_loading_the_model(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err
