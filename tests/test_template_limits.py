"""Chat templates are someone else's code: a hostile one is refused quickly with a one-line reason and
bounded memory, never a hang, a multi-GB allocation, a traceback or a crash; real ones render as before."""

from __future__ import annotations

import tracemalloc

import pytest

from aigc import jinja_sandbox
from aigc.chat import ChatTemplate, Message, check_chat_template, install_chat_template, load_chat_template
from aigc.errors import AigcError
from aigc.jinja_sandbox import TemplateLimitError

HI = [Message("user", "hi")]
MiB = 1 << 20


def doubled(times: int, step: str) -> str:
    """A template that doubles `ns.s` `times` times in a loop (`step` is the doubling expression)."""
    return "{% set ns = namespace(s='x') %}{% for i in range(" + str(times) + ") %}{% set ns.s = " + step + " %}"


# Each makes gigabytes or runs for hours without limits (figures from a 2-core CPU host, today's jinja2).
HOSTILE = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "repetition": "{{ 'x' * 10**9 }}",
    "list repetition": "{{ ([0] * 10**9) | length }}",
    "doubling with ~": doubled(64, "ns.s ~ ns.s") + "{% endfor %}",
    "doubling with +": doubled(64, "ns.s + ns.s") + "{% endfor %}",
    "doubling with *": doubled(64, "ns.s * 2") + "{% endfor %}",
    "doubling without a loop": "{% set a = 'xxxxxxxx' %}" + "{% set a = a ~ a %}" * 40 + "{{ a }}",
    "nested list literals": "{% set a = ['x'] %}" + "{% set a = [a, a] %}" * 40 + "{{ a }}",
    "tojson indent": "{{ messages | tojson(indent=10**9) }}",
    "center method": "{{ 'x'.center(10**9) }}",
    "center filter": "{{ 'x' | center(10**9) }}",
    "indent filter": "{{ ('\\n' * 100000) | indent(100000) }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "percent width": "{{ '%1000000000d' % 1 }}",
    "replace empty": "{% set s = 'x' * 100000 %}{{ s.replace('', s) }}",
    "join": "{% set s = 'x' * 1000 %}{{ s.join(range(100000) | map('string')) }}",
    "list of characters": "{% set s = '好' * 1000000 %}{{ (s | list) | length }}",
    "list of a generator": "{% set s = '好' * 1000000 %}{{ (s | map('string') | list) | length }}",
    "split": "{% set s = '好 ' * 1000000 %}{{ s.split() | length }}",
    "power": "{{ 7 ** 1000000000 }}",
    "squaring": "{% set ns = namespace(n=7) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "literal text in loops": "{% for i in range(10000) %}{% for j in range(10000) %}" + "y" * 1000 + "{% endfor %}"
    "{% endfor %}",
    "set blocks in loops": "{% for i in range(10000) %}{% set x %}{% for j in range(10000) %}abcdefgh{% endfor %}"
    "{% endset %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ f(60) }}",
    "silent nested loops": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
}


@pytest.fixture
def fast_deadline(monkeypatch):
    """A shorter wall-time limit, so the tests of the time limit take a fraction of a second each."""
    monkeypatch.setattr(jinja_sandbox.budget, "TIME_LIMIT_S", 0.3)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_template_is_refused_with_bounded_memory(name, fast_deadline):
    template = ChatTemplate(HOSTILE[name], origin="T")
    tracemalloc.start()
    try:
        with pytest.raises(TemplateLimitError) as caught:
            template.render(HI)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith("chat template T ") and "\n" not in message
    assert any(word in message for word in ("limit", "recurses", "takes more than"))
    assert peak < 64 * MiB, f"{name}: {peak / MiB:.0f} MiB"


def test_lipsum_is_not_available():
    with pytest.raises(AigcError, match="'lipsum' is undefined"):
        ChatTemplate("{{ lipsum(10**6) }}").render(HI)


def test_a_loop_past_the_deadline_is_stopped_by_the_time_limit(fast_deadline):
    with pytest.raises(TemplateLimitError, match=r"takes more than 0\.3 s to render"):
        ChatTemplate(HOSTILE["silent nested loops"]).render(HI)


def test_the_range_cap_names_the_limit():
    with pytest.raises(TemplateLimitError, match="range\\(\\) of 100,000 numbers; the limit is 10,000"):
        ChatTemplate("{% for i in range(100000) %}{% endfor %}").render(HI)


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ 1//0 }}", "ZeroDivisionError: integer division or modulo by zero"),
        ("{{ messages[5]['content'] }}", "failed to render these messages"),
        ("{{ raise_exception('no system role') }}", "no system role"),
        ("{{ raise_exception('two\\nlines') }}", "two lines"),
        ("{{ (1).__class__.__mro__() }}", "failed to render"),  # the sandbox hides internals
    ],
)
def test_a_failing_template_is_a_one_line_aigc_error(source, message):
    with pytest.raises(AigcError, match=message) as caught:
        ChatTemplate(source).render(HI)
    assert "\n" not in str(caught.value)


def test_a_template_nested_past_the_parser_is_refused():
    with pytest.raises(AigcError, match="does not (compile|parse)"):
        ChatTemplate("{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}")


def test_a_template_too_long_is_refused():
    with pytest.raises(TemplateLimitError, match="characters long"):
        ChatTemplate("x" * (jinja_sandbox.MAX_SOURCE_CHARS + 1))


def test_a_long_conversation_fits_the_budget():
    # The budget grows with the conversation: a template may copy it several times (here: four).
    source = "{% for m in messages %}{{ m['content'] ~ m['content'] }}{{ (m['content'] + m['content']) }}{% endfor %}"
    content = "x" * (jinja_sandbox.BUDGET_BASE // 2)
    assert len(ChatTemplate(source).render([Message("user", content)])) == 4 * len(content)


def test_a_non_utf8_template_file_is_a_one_line_error(make_chat_run, tmp_path):
    run = make_chat_run()
    (run / "chat_template.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    with pytest.raises(AigcError, match="is not UTF-8 text"):
        load_chat_template(run)
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(AigcError, match="is not UTF-8 text"):
        install_chat_template(run, bad)


def test_check_refuses_a_hostile_template_and_keeps_one_that_refuses_system_messages(fast_deadline):
    with pytest.raises(TemplateLimitError, match="chat template of M.gguf takes more than"):
        check_chat_template(HOSTILE["silent nested loops"], "of M.gguf")
    with pytest.raises(AigcError, match="not text"):
        check_chat_template(["a", "list"], "of M.gguf")
    no_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    assert check_chat_template(no_system, "of M.gguf").source == no_system
    with pytest.raises(AigcError, match="renders none of the sample conversations"):
        check_chat_template("{{ raise_exception('never') }}", "of M.gguf")


# Every construct the parse step rewrites (loops, ~, literals, literal text) and the ones around them.
CONSTRUCTS = """
{%- macro row(m, sep=': ') -%}{{ m.role ~ sep ~ m.content }}{%- endmacro -%}
{%- macro wrap() -%}[{{ caller() }}]{%- endmacro -%}
{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}
{{ row(m) }}{% if loop.first %} first{% endif %} {{ loop.revindex }} {{ loop.cycle('a', 'b') }}
{% else %}none{% endfor %}
{% set block %}{% for k, v in {'b': 2, 'a': 1} | dictsort %}{{ k }}={{ v }};{% endfor %}{% endset %}{{ block }}
{% call wrap() %}{{ (1, 2) | list }} {{ [3, [4, 5]] | tojson }} {{ {'x': (6,)} }}{% endcall %}
{% filter upper %}{{ messages | map(attribute='role') | join('|') }}{% endfilter %}
{% set tree = [{'n': 'a', 'kids': [{'n': 'b', 'kids': []}]}] %}
{% for item in tree recursive %}{{ item.n }}({{ loop(item.kids) }}){% endfor %}
{% set ns = namespace(total=0) %}{% for i in range(5) %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }}
{{ 'a' ~ 1 ~ none ~ [2] }} {{ "%05.1f|%s" | format(3.14159, 'x') }} {{ '{:>6}'.format('r') }} {{ 'abc' * 2 }}
"""


def test_rewritten_templates_render_as_the_plain_sandbox_does():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from aigc.jinja_sandbox import LimitedEnvironment

    options = dict(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    plain = ImmutableSandboxedEnvironment(**options).from_string(CONSTRUCTS).render(messages=messages)
    limited = jinja_sandbox.render(
        LimitedEnvironment(**options).from_string(CONSTRUCTS), {"messages": messages}, input_chars=3
    )
    assert limited == plain and "2/2" in plain and "a(b())" in plain
