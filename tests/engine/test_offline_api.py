"""The offline API as vLLM users write it: progress bars, llm_engine, chat options, priorities."""

from __future__ import annotations

import pytest

from kvforge import SamplingParams
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=4)
USER = [{"role": "user", "content": "Name a colour."}]


def test_generate_shows_a_progress_bar_unless_told_not_to(llm, capsys):
    llm.generate(PROMPTS[:2], GREEDY)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err and "output:" in err
    llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_use_tqdm_takes_a_tqdm_factory(llm):
    made = []

    def factory(**kwargs):
        from tqdm import tqdm
        made.append(kwargs["total"])
        return tqdm(disable=True, **kwargs)

    llm.generate(PROMPTS[:3], GREEDY, use_tqdm=factory)
    assert made == [3]


def test_llm_engine_is_the_engine(llm):
    assert llm.llm_engine is llm.engine


def test_priorities_are_taken_per_prompt(llm):
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, priority=[1, 0])
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in
                                                 llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)]
    with pytest.raises(ValueError, match="2 prompts"):
        llm.generate(PROMPTS[:2], GREEDY, priority=[0])


def test_chat_takes_several_conversations_and_a_template_of_ones_own(llm):
    outs = llm.chat([USER, USER + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]],
                    GREEDY, use_tqdm=False)
    assert len(outs) == 2
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    out = llm.chat(USER, GREEDY, use_tqdm=False, chat_template=template)[0]
    assert out.prompt == "[user] Name a colour.\n[assistant]"


def test_continue_final_message_continues_the_assistant_turn(llm):
    conv = USER + [{"role": "assistant", "content": "My favourite colour is"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("My favourite colour is")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(conv, GREEDY, continue_final_message=True)
