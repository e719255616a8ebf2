"""The sandbox's bounds, attacked by family: every route to a long string, a big list or
number, or a long render, each at sizes that must render and sizes that must stop, and
stop fast, with TemplateLimit naming the limit."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from backend.workflows.templates import (
    MAX_INT_BITS,
    MAX_VALUE_CHARS,
    TemplateLimit,
    environment,
    evaluate,
    render,
)

# A refused payload must fail well before anyone would notice: the render's own budget
# (1 s) plus scheduling slack on a loaded machine.
FAST_S = 1.5
CAP = MAX_VALUE_CHARS

Family = Callable[[int], str]


def stops(source: str, limit: str = "", **kwargs: float) -> str:
    started = time.monotonic()
    with pytest.raises(TemplateLimit) as info:
        render(source, {}, **kwargs)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert elapsed < FAST_S, f"took {elapsed:.2f} s to refuse {source[:80]!r}: {info.value}"
    assert limit in str(info.value), str(info.value)
    return str(info.value)


# Size: each family takes a size and builds about that many characters (or bits). ------

SIZE_FAMILIES: dict[str, Family] = {
    "string repetition": lambda n: f"{{{{ 'x' * {n} }}}}",
    "repetition on the left": lambda n: f"{{{{ {n} * 'xy' }}}}",
    "list repetition": lambda n: f"{{{{ ([1, 2] * {n // 6})|length }}}}",
    "string concatenation": lambda n: f"{{{{ ('x' * {n // 2}) + ('y' * {n // 2 + 2}) }}}}",
    "tilde concatenation": lambda n: f"{{{{ ('x' * {n // 2}) ~ ('y' * {n // 2 + 2}) }}}}",
    "str.format width": lambda n: f"{{{{ '{{:>{n}}}'.format(1) }}}}",
    "str.format nested width": lambda n: f"{{{{ '{{:{{w}}}}'.format(1, w={n}) }}}}",
    "str.format precision": lambda n: f"{{{{ '{{:.{{p}}f}}'.format(1.5, p={n}) }}}}",
    "str.format fill and width": lambda n: f"{{{{ '{{:0^{n}}}'.format('x') }}}}",
    "str.format repeated field": lambda n: (
        f"{{{{ ('{{0}}' * 100).format('x' * {n // 100 + 1}) }}}}"
    ),
    "str.format_map width": lambda n: f"{{{{ '{{a:>{n}}}'.format_map({{'a': 1}}) }}}}",
    "printf width": lambda n: f"{{{{ '%{n}d' % 1 }}}}",
    "printf star width": lambda n: f"{{{{ '%*d' % ({n}, 1) }}}}",
    "printf precision": lambda n: f"{{{{ '%.{n}f' % 1.5 }}}}",
    "printf star precision": lambda n: f"{{{{ '%.*d' % ({n}, 1) }}}}",
    "printf mapping key": lambda n: f"{{{{ '%(a){n}s' % {{'a': 'x'}} }}}}",
    "printf repeated spec": lambda n: f"{{{{ ('%s' * 100) % (('x' * {n // 100 + 1},) * 100) }}}}",
    "format filter": lambda n: f"{{{{ '%{n}s'|format('x') }}}}",
    "center filter": lambda n: f"{{{{ 'x'|center({n}) }}}}",
    "indent filter": lambda n: f"{{{{ ('x\\n' * 1000)|indent({n // 1000}) }}}}",
    "indent filter with a string": lambda n: f"{{{{ ('x\\n' * 1000)|indent('-' * {n // 1000}) }}}}",
    "wordwrap filter": lambda n: (
        f"{{{{ ('a ' * 1000)|wordwrap(1, wrapstring='x' * {n // 2000}) }}}}"
    ),
    "lipsum": lambda n: f"{{{{ lipsum({n // 1600}, max=100) }}}}",
    "bytes printf width": lambda n: f"{{{{ ('%{n}d'.encode() % 1)|length }}}}",
    "bytes.ljust": lambda n: f"{{{{ 'x'.encode().ljust({n})|length }}}}",
    "urlize attributes": lambda n: (
        f"{{{{ ('x http://a.com ' * 100)|urlize(target='t' * {n // 100})|length }}}}"
    ),
    "str.ljust": lambda n: f"{{{{ 'x'.ljust({n}) }}}}",
    "str.rjust": lambda n: f"{{{{ 'x'.rjust({n}) }}}}",
    "str.center": lambda n: f"{{{{ 'x'.center({n}) }}}}",
    "str.zfill": lambda n: f"{{{{ '1'.zfill({n}) }}}}",
    "str.expandtabs": lambda n: f"{{{{ ('\\t' * 100).expandtabs({n // 100}) }}}}",
    "join filter of a range": lambda n: f"{{{{ range(1000)|join('x' * {n // 1000}) }}}}",
    "join filter of repeated ranges": lambda n: (
        f"{{{{ ((range(1000)|list) * {n // 4000 + 1})|join(',') }}}}"
    ),
    "str.join of a generator": lambda n: (
        f"{{{{ ('x' * {n // 1000}).join(range(1000)|map('string')) }}}}"
    ),
    "replace filter": lambda n: f"{{{{ ('x' * 1000)|replace('x', 'y' * {n // 1000}) }}}}",
    "replace filter on empty": lambda n: f"{{{{ ('x' * 999)|replace('', 'y' * {n // 1000}) }}}}",
    "str.replace": lambda n: f"{{{{ ('x' * 1000).replace('x', 'y' * {n // 1000}) }}}}",
    "str.translate": lambda n: f"{{{{ ('a' * 1000).translate({{97: 'b' * {n // 1000}}}) }}}}",
    "int.to_bytes": lambda n: f"{{{{ (1).to_bytes({n}, 'big')|length }}}}",
    "batch filter fill": lambda n: f"{{{{ [1]|batch({n // 30}, 'x' * 30)|list|length }}}}",
    "slice filter fill": lambda n: f"{{{{ [1]|slice({n // 30}, 'x' * 30)|list|length }}}}",
    "map default": lambda n: (
        f"{{{{ ([{{}}] * 100)|map(attribute='a', default='x' * {n // 100})|list|length }}}}"
    ),
    "tojson indent": lambda n: (
        "{% set ns = namespace(x=1) %}{% for i in range(30) %}{% set ns.x = [ns.x] %}"
        f"{{% endfor %}}{{{{ ns.x|tojson(indent={n // 500}) }}}}"
    ),
    "shared value in a list": lambda n: (
        f"{{% set big = 'x' * {n // 1000} %}}{{{{ [big] * 1000 }}}}"
    ),
    "namespace filled after it was shared": lambda n: (
        "{% set ns = namespace(x='') %}{% set l = [ns] * 1000 %}"
        f"{{% set ns.x = 'y' * {n // 1000} %}}{{{{ l }}}}"
    ),
    "namespace in a string": lambda n: (
        "{% set ns = namespace(x='') %}{% set l = [ns] * 1000 %}"
        f"{{% set ns.x = 'y' * {n // 1000} %}}{{{{ (l ~ '')|length }}}}"
    ),
    "string filter": lambda n: (
        f"{{% set big = 'x' * {n // 1000} %}}{{{{ ([big] * 1000)|string }}}}"
    ),
    "upper filter of a list": lambda n: (
        f"{{% set big = 'x' * {n // 1000} %}}{{{{ ([big] * 1000)|upper|length }}}}"
    ),
    "buffered block": lambda n: (
        f"{{% set big = 'x' * {n // 100} %}}{{% set out %}}{{% for i in range(100) %}}"
        "{{ big }}{% endfor %}{% endset %}{{ out|length }}"
    ),
    "filter block": lambda n: (
        f"{{% set big = 'x' * {n // 100} %}}{{% filter upper %}}{{% for i in range(100) %}}"
        "{{ big }}{% endfor %}{% endfilter %}"
    ),
    "dict literal of shared values": lambda n: (
        f"{{% set big = 'x' * {n // 4} %}}{{{{ {{'a': big, 'b': big, 'c': big, 'd': big}} }}}}"
    ),
    "tuple literal of shared values": lambda n: (
        f"{{% set big = 'x' * {n // 4} %}}{{{{ (big, big, big, big)|length }}}}"
    ),
}

# Half the cap renders; twice and a hundred times the cap are refused.
FITS = CAP // 2 - 10_000
TOO_BIG = (2 * CAP, 100 * CAP)


@pytest.mark.parametrize("family", SIZE_FAMILIES)
def test_each_size_family_renders_below_the_cap(family: str) -> None:
    # Time is not what is measured here: a loaded machine may take long over these.
    render(SIZE_FAMILIES[family](1000), {}, seconds=30)
    render(SIZE_FAMILIES[family](FITS), {}, seconds=30)


@pytest.mark.parametrize("size", TOO_BIG)
@pytest.mark.parametrize("family", SIZE_FAMILIES)
def test_each_size_family_is_refused_fast_above_the_cap(family: str, size: int) -> None:
    stops(SIZE_FAMILIES[family](size), f"more than {CAP} characters")


# Doubling: each pass doubles the value, by every operator that can. ---------------------

DOUBLING: dict[str, str] = {
    "tilde": "{% set ns.x = ns.x ~ ns.x %}",
    "plus on strings": "{% set ns.x = ns.x + ns.x %}",
    "plus on lists": "{% set ns.l = ns.l + ns.l %}",
    "nested list": "{% set ns.l = [ns.l, ns.l] %}",
    "nested dict": "{% set ns.l = {'a': ns.l, 'b': ns.l} %}",
    "nested tuple": "{% set ns.l = (ns.l, ns.l) %}",
    "dict call": "{% set ns.l = dict(a=ns.l, b=ns.l) %}",
    "bytes": "{% set ns.x = ns.x.encode() + ns.x.encode() %}{% set ns.x = ns.x.decode() %}",
    "list repetition": "{% set ns.l = ns.l * 2 %}",
    "format": "{% set ns.x = '{0}{0}'.format(ns.x) %}",
    "printf": "{% set ns.x = '%s%s' % (ns.x, ns.x) %}",
    "join": "{% set ns.x = [ns.x, ns.x]|join %}",
    "replace": "{% set ns.x = ns.x|replace('a', 'aa') %}",
}


def doubling(step: str, passes: int) -> str:
    return (
        "{% set ns = namespace(x='a' * 100, l=['a' * 100]) %}"
        f"{{% for i in range({passes}) %}}{step}{{% endfor %}}"
        "{{ ns.x|length }} {{ ns.l|length }}"
    )


@pytest.mark.parametrize("step", DOUBLING)
def test_doubling_in_a_loop_renders_a_few_times(step: str) -> None:
    render(doubling(DOUBLING[step], 8), {}, seconds=30)


@pytest.mark.parametrize("passes", [40, 64, 1000])
@pytest.mark.parametrize("step", DOUBLING)
def test_doubling_in_a_loop_is_refused_fast(step: str, passes: int) -> None:
    stops(doubling(DOUBLING[step], passes), f"more than {CAP} characters")


def test_gathering_rows_in_a_loop_stays_cheap() -> None:
    # The usual way to collect in an immutable sandbox; measuring everything gathered
    # so far at every pass would make it quadratic in Python and hit the budget.
    rows = [{"name": f"r{i}", "n": i, "tags": ["a", "b"]} for i in range(2000)]
    source = (
        "{% set ns = namespace(l=[]) %}{% for r in rows %}{% set ns.l = ns.l + [r] %}"
        "{% endfor %}{{ ns.l|length }}"
    )
    assert render(source, {"rows": rows}) == "2000"
    gathered = evaluate("rows + rows", {"rows": rows})
    assert type(gathered) is list and len(gathered) == 4000


def test_structurally_equal_shared_values_cannot_be_built_to_compare_slowly() -> None:
    # Two separately built but equal values of 2**40 parts would compare for hours.
    build = "{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}"
    stops(
        "{% set ns = namespace(a='x' * 10, b='x' * 10) %}" + build + "{% endfor %}"
        "{{ ns.a == ns.b }}"
    )


# Numbers -----------------------------------------------------------------------------------

INT_FAMILIES: dict[str, Family] = {
    # Jinja's ** associates to the left: 9 ** 9 ** n is (9 ** 9) ** n.
    "left-associated power": lambda bits: f"{{{{ 9 ** 9 ** {bits // 29} }}}}",
    "right-associated power": lambda bits: f"{{{{ 2 ** (2 ** {bits.bit_length() - 1}) }}}}",
    "power of a power": lambda bits: f"{{{{ (2 ** {bits // 4}) ** 4 }}}}",
    "power chain in parentheses": lambda bits: f"{{{{ 3 ** (2 ** (1 ** 1) * {bits // 4}) }}}}",
    "negative base": lambda bits: f"{{{{ (-2) ** {bits} }}}}",
    "product": lambda bits: f"{{{{ (2 ** {bits // 2}) * (2 ** {bits // 2}) }}}}",
    "squaring in a loop": lambda bits: (
        "{% set ns = namespace(x=3) %}"
        f"{{% for i in range({bits.bit_length() - 1}) %}}{{% set ns.x = ns.x * ns.x %}}"
        "{% endfor %}{{ ns.x > 0 }}"
    ),
    "doubling by addition": lambda bits: (
        "{% set ns = namespace(x=1) %}"
        f"{{% for i in range({min(bits, 100_000)}) %}}{{% set ns.x = ns.x + ns.x %}}{{% endfor %}}"
        "{{ ns.x > 0 }}"
    ),
    "doubling by subtraction": lambda bits: (
        "{% set ns = namespace(x=1) %}"
        f"{{% for i in range({min(bits, 100_000)}) %}}{{% set ns.x = ns.x - (0 - ns.x) %}}"
        "{% endfor %}"
        "{{ ns.x > 0 }}"
    ),
    # Hexadecimal: Python refuses decimal strings of more than 4300 digits on its own.
    "int filter": lambda bits: f"{{{{ ('f' * {bits // 4})|int(base=16) > 0 }}}}",
}


@pytest.mark.parametrize("family", INT_FAMILIES)
def test_each_number_family_renders_below_the_cap(family: str) -> None:
    render(INT_FAMILIES[family](64), {}, seconds=30)
    render(INT_FAMILIES[family](MAX_INT_BITS // 2), {}, seconds=30)


@pytest.mark.parametrize("bits", [4 * MAX_INT_BITS, 2**20])
@pytest.mark.parametrize("family", INT_FAMILIES)
def test_each_number_family_is_refused_fast_above_the_cap(family: str, bits: int) -> None:
    stops(INT_FAMILIES[family](bits), f"more than {MAX_INT_BITS} bits")


def test_floats_overflow_instead_of_growing() -> None:
    with pytest.raises(OverflowError):
        render("{{ 10.0 ** 400 }}", {})
    assert render("{{ 1e308 * 10 }}", {}) == "inf"


# Time -------------------------------------------------------------------------------------

TIME_FAMILIES: dict[str, Family] = {
    "nested loops": lambda n: (
        f"{{% for i in range({n}) %}}{{% for j in range({n}) %}}{{% endfor %}}{{% endfor %}}"
    ),
    "three nested loops": lambda n: (
        f"{{% for i in range({n}) %}}{{% for j in range({n}) %}}{{% for k in range({n}) %}}"
        "{% endfor %}{% endfor %}{% endfor %}"
    ),
    "loop with a condition only": lambda n: (
        f"{{% for i in range({n}) %}}{{% for j in range({n}) if j < 0 %}}{{% endfor %}}"
        "{% endfor %}"
    ),
    "recursive loop": lambda n: (
        f"{{% for x in [{2 * n.bit_length()}] recursive %}}"
        "{% if x > 0 %}{{ loop([x - 1, x - 1]) }}{% endif %}{% endfor %}"
    ),
    "map over filters": lambda n: (
        f"{{% for i in range({n}) %}}{{{{ range({n})|map('string')|map('upper')|list|length }}}}"
        "{% endfor %}"
    ),
    "sum of lists": lambda n: f"{{{{ range({min(n, 60_000)})|batch(1)|sum(start=[])|length }}}}",
    "quadratic list building": lambda n: (
        "{% set ns = namespace(l=[]) %}"
        f"{{% for i in range({n}) %}}{{% set ns.l = ns.l + [i] %}}{{% endfor %}}"
        "{{ ns.l|length }}"
    ),
}


@pytest.mark.parametrize("family", TIME_FAMILIES)
def test_each_time_family_renders_when_small(family: str) -> None:
    render(TIME_FAMILIES[family](10), {}, seconds=30)


@pytest.mark.parametrize("n", [60_000, 100_000])
@pytest.mark.parametrize("family", TIME_FAMILIES)
def test_each_time_family_is_stopped_by_the_render_budget(family: str, n: int) -> None:
    # Half the default budget leaves a loaded machine room for the 1.5 s check.
    stops(TIME_FAMILIES[family](n), "longer than 0.5 s", seconds=0.5)


def test_the_default_render_budget_is_one_second() -> None:
    started = time.monotonic()
    stops(TIME_FAMILIES["nested loops"](100_000), "longer than 1 s")
    assert time.monotonic() - started > 0.9


def test_a_deadline_sooner_than_the_budget_stops_the_render_there() -> None:
    started = time.monotonic()
    stops(TIME_FAMILIES["nested loops"](100_000), "node's time limit", deadline=started + 0.2)
    assert time.monotonic() - started < 0.7


def test_a_passed_deadline_stops_the_render_before_it_starts() -> None:
    stops("{{ 1 }}", "node's time limit", deadline=time.monotonic() - 1)


def test_evaluate_is_bounded_like_render() -> None:
    heavy = "range(100000)|map('string')|map('upper')|map('lower')|list|length"
    started = time.monotonic()
    with pytest.raises(TemplateLimit, match="node's time limit"):
        evaluate(heavy, {}, deadline=started + 0.05)
    assert time.monotonic() - started < 0.6
    with pytest.raises(TemplateLimit, match="more than"):
        evaluate("'x' * 10 ** 8", {})
    assert evaluate("[1, 2] * 2", {}) == [1, 2, 1, 2]


def test_the_budget_is_per_render_not_per_process() -> None:
    for _ in range(3):
        assert render("{% for i in range(3) %}{{ i }}{% endfor %}", {}, seconds=0.05) == "012"
        time.sleep(0.06)


def test_every_block_body_ticks_in_the_generated_code() -> None:
    source = environment.compile(
        "{% for i in range(2) recursive %}{% if i %}a{% elif i %}b{% else %}c{% endif %}"
        "{% endfor %}{% set x %}y{% endset %}{% filter upper %}z{% endfilter %}",
        raw=True,
    )
    # The template, the loop body, three branches, the block set and the filter block.
    assert source.count("environment.tick()") >= 7, source


# Globals ----------------------------------------------------------------------------------


def test_range_is_capped() -> None:
    with pytest.raises(OverflowError):
        render("{{ range(100001)|length }}", {})
    assert render("{{ range(100000)|length }}", {}) == "100000"


# Output -----------------------------------------------------------------------------------


def test_the_output_cap_counts_every_chunk() -> None:
    source = "{% for i in range(20) %}{{ 'x' * 100000 }}{% endfor %}"
    stops(source, "rendered output is longer than 1000000 characters")
    assert len(render(source, {}, max_chars=2_000_000)) == 2_000_000


# Ordinary templates are untouched -----------------------------------------------------------

ORDINARY = {
    "{{ [1, 2]|join(',') }}": "1,2",
    "{{ '%05.1f' % 2.5 }}|{{ '%s-%d' % ('a', 3) }}|{{ '%(a)s' % {'a': 1} }}": "002.5|a-3|1",
    "{{ '{:>4}'.format('a') }}|{{ '{0}{0}'.format('b') }}|{{ '{a}'.format_map({'a': 2}) }}": (
        "   a|bb|2"
    ),
    "{{ 'a' ~ 1 ~ [1] ~ none }}": "a1[1]None",
    "{% for k, v in {'a': 1, 'b': 2}|dictsort %}{{ k }}={{ v }};{% endfor %}": "a=1;b=2;",
    "{{ {'a': [1, 2]}|tojson }}": '{"a": [1, 2]}',
    "{{ x|default('d') }}|{{ (1, 2) }}|{{ {'k': 'v'} }}": "d|(1, 2)|{'k': 'v'}",
    "{{ 'ab'|center(6) }}|{{ 'a\nb'|indent(2) }}|{{ 'x'|replace('x', 'yy') }}": "  ab  |a\n  b|yy",
    "{{ 'x'.ljust(3) }}|{{ '7'.zfill(3) }}|{{ '-'.join(['a', 'b']) }}": "x  |007|a-b",
    "{{ 2 ** 10 }}|{{ 7 % 3 }}|{{ 1 + 2 }}|{{ 5 - 7 }}|{{ [1] + [2] }}|{{ 1.5 * 2 }}": (
        "1024|1|3|-2|[1, 2]|3.0"
    ),
    "{% set ns = namespace(n=0) %}{% for i in range(5) %}{% set ns.n = ns.n + i %}"
    "{% endfor %}{{ ns.n }}": "10",
    "{% for x in [[1, [2]], 3] recursive %}{% if x is iterable %}{{ loop(x) }}"
    "{% else %}{{ x }}{% endif %}{% endfor %}": "123",
    "{% autoescape true %}{{ '<b>' }}{% endautoescape %}": "&lt;b&gt;",
    "{{ [3, 1, 2]|sort|list }}|{{ [[1], [2]]|sum(start=[]) }}|{{ [1, 2, 3]|batch(2)|list }}": (
        "[1, 2, 3]|[1, 2]|[[1, 2], [3]]"
    ),
}


@pytest.mark.parametrize("source", ORDINARY)
def test_ordinary_templates_render_as_before(source: str) -> None:
    assert render(source, {}) == ORDINARY[source]
