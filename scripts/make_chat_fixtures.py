#!/usr/bin/env python3
"""Builds tests/fixtures/chat/: a tiny locally trained byte-level BPE tokenizer, three
real-world-shaped chat templates (Qwen2.5 ChatML, Llama-3.x, Mistral-instruct) and the strings /
ids that transformers' `apply_chat_template` produces for them (expected.json). The Rust test
tests/tokenizer_chat.rs must reproduce every one byte for byte.

Run with a Python that has transformers (>=4.4x / 5.x), tokenizers and jinja2:
    python scripts/make_chat_fixtures.py
No network is needed: everything is built locally.
"""
import datetime as _dt
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "chat")

# strftime_now() is pinned to this instant (UTC) so the Llama fixtures are reproducible; the Rust
# test pins the same instant with ChatTemplate::set_fixed_time.
FIXED_UNIX = 1741348800  # 2025-03-07T12:00:00Z

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]",
]

CORPUS = """
The quick brown fox jumps over the lazy dog. You are a helpful assistant.
What is the capital of France? The capital of France is Paris.
Compute 12 + 30 and answer with a number: 42. Let's think step by step.
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
Given the following functions, please respond with a JSON for a function call with its proper arguments.
system user assistant tool ipython function parameters description type object string required properties
Über café naïve — 你好, 世界! emoji 🙂 tabs\tand\nnewlines   spaces.
""" * 3


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def with_bos(tok, bos):
    t = Tokenizer.from_str(tok.to_str())
    bos_id = t.token_to_id(bos)
    t.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        ),
    ])
    return t


QWEN = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception("Unknown role '" + message.role + "': expected system, user, assistant, tool or ipython") }}
    {%- endif %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

MISTRAL = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Small templates that poke at Jinja/Python corners real templates rely on; rendered with the
# Qwen tokenizer (chat_template= override).
CUSTOM = {
    "parts": r"""{% for m in messages %}<{{ m.role }}>
{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% elif p.type == 'image' %}<image>{% endif %}{% endfor %}{% endif %}
</{{ m.role }}>
{% endfor %}{% if add_generation_prompt %}<assistant>
{% endif %}""",
    "pymethods": r"""{%- for m in messages -%}
{%- set c = m.content -%}
[{{ m.role | upper }}] {{ c.strip() }}|{{ c.startswith('Hi') }}|{{ c.endswith('?') }}|{{ c.split(' ') | length }}|{{ c.lstrip().split('\n')[0] }}|{{ c.replace('a', 'A') }}|{{ c.rstrip().lower() }}
{% if m.meta is defined %}{% for k, v in m.meta.items() %}{{ k }}={{ v }};{% endfor %}{% endif %}
{%- if loop.index > 2 %}{% break %}{% endif -%}
{%- endfor -%}
""",
    "tojson": r"""{% for m in messages %}{{ m | tojson }}
{{ m | tojson(indent=2) }}
{% endfor %}{{ {'html': '<b>&amp;</b>', 'q': "it's", 'u': 'é✓'} | tojson }}""",
    "namespace_loop": r"""{%- set ns = namespace(last_user=-1, n=0) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
    {%- if m.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
{%- endfor %}
last_user={{ ns.last_user }} n={{ ns.n }} first={{ messages[0].role }} last={{ messages[-1].role }} rev={{ (messages | map(attribute='role') | list | reverse | join(',')) }}
{% if bos_token is defined %}bos={{ bos_token }}{% endif %} eos={{ eos_token }} gen={{ add_generation_prompt }}
{%- if tools is none %} tools=none{% endif %}
""",
}


def conversations():
    sys_user_asst = [
        {"role": "system", "content": "You are a terse math tutor."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "  And 2+2?  \n"},
    ]
    return {
        "user_only": [{"role": "user", "content": "What is the capital of France?"}],
        "system_multi_turn": sys_user_asst,
        "unicode": [
            {"role": "user", "content": "Über café naïve — 你好, 世界! 🙂\ttab\nnewline"},
            {"role": "assistant", "content": "  spaced answer  "},
            {"role": "user", "content": "<|im_start|> literal?"},
        ],
    }


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
        ],
    },
    {"role": "tool", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
    {"role": "tool", "content": "second result"},
]

LLAMA_TOOL_CHAT = TOOL_CHAT[:3]


def main():
    import transformers
    from transformers import AutoTokenizer
    import transformers.utils.chat_template_utils as ctu

    class FixedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return _dt.datetime.fromtimestamp(FIXED_UNIX, _dt.timezone.utc).replace(tzinfo=None)

    ctu.datetime = FixedDatetime

    base = train_tokenizer()
    models_ = {
        # Qwen: inline chat_template string in tokenizer_config.json, no BOS.
        "qwen2.5": dict(
            tok=base,
            config={
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 32768,
                "chat_template": QWEN,
            },
            jinja=None,
        ),
        # Llama-3: AddedToken objects, template in chat_template.jinja (transformers 5 layout),
        # plus a stale inline one that the .jinja file must win over.
        "llama3": dict(
            tok=with_bos(base, "<|begin_of_text|>"),
            config={
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False, "special": True},
                "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False, "special": True},
                "chat_template": "STALE {{ messages }}",
            },
            jinja=LLAMA,
        ),
        # Mistral: list of named templates (older transformers layout), BOS <s>.
        "mistral": dict(
            tok=with_bos(base, "<s>"),
            config={
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": [
                    {"name": "default", "template": MISTRAL},
                    {"name": "tool_use", "template": "UNUSED {{ tools }}"},
                ],
            },
            jinja=None,
        ),
    }

    expected = {"fixed_unix": FIXED_UNIX, "transformers": transformers.__version__, "models": {}, "custom": []}
    for name, m in models_.items():
        d = os.path.join(ROOT, name)
        os.makedirs(d, exist_ok=True)
        m["tok"].save(os.path.join(d, "tokenizer.json"), pretty=False)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in m["config"].items() if v is not None}, f, indent=2, ensure_ascii=False)
        jpath = os.path.join(d, "chat_template.jinja")
        if m["jinja"] is not None:
            with open(jpath, "w") as f:
                f.write(m["jinja"])
        elif os.path.exists(jpath):
            os.remove(jpath)

        tok = AutoTokenizer.from_pretrained(d)
        cases = []
        convs = conversations()
        if name == "mistral":
            convs["bad_alternation"] = [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
            ]
            convs["bad_role"] = [{"role": "tool", "content": "x"}]
        if name == "llama3":
            convs["bad_role"] = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
        for cname, msgs in convs.items():
            for agp in (False, True):
                case = {"name": cname, "messages": msgs, "add_generation_prompt": agp}
                try:
                    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
                    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=agp, return_dict=False)
                    if hasattr(ids, "keys"):
                        ids = ids["input_ids"]
                    case["text"] = text
                    case["ids"] = list(ids)
                except Exception as e:  # raise_exception -> jinja2 TemplateError
                    case["error"] = str(e)
                cases.append(case)
        if name == "qwen2.5":
            for agp in (False, True):
                text = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=agp)
                cases.append({"name": "tools", "messages": TOOL_CHAT, "tools": TOOLS,
                              "add_generation_prompt": agp, "text": text,
                              "ids": tok(text, add_special_tokens=False)["input_ids"]})
        if name == "llama3":
            for extra in ({}, {"tools_in_user_message": False}):
                text = tok.apply_chat_template(LLAMA_TOOL_CHAT, tools=TOOLS, tokenize=False,
                                               add_generation_prompt=True, **extra)
                cases.append({"name": "tools", "messages": LLAMA_TOOL_CHAT, "tools": TOOLS, "extra": extra,
                              "add_generation_prompt": True, "text": text,
                              "ids": tok(text, add_special_tokens=False)["input_ids"]})
            text = tok.apply_chat_template(convs["user_only"], tokenize=False, date_string="01 Jan 2030")
            cases.append({"name": "date_string", "messages": convs["user_only"], "extra": {"date_string": "01 Jan 2030"},
                          "add_generation_prompt": False, "text": text,
                          "ids": tok(text, add_special_tokens=False)["input_ids"]})
        raw = ["Hello world", "The capital of France is Paris.", " leading space and 🙂", ""]
        encodes = [{"text": t,
                    "ids_special": tok(t)["input_ids"],
                    "ids_plain": tok(t, add_special_tokens=False)["input_ids"]} for t in raw]
        expected["models"][name] = {
            "vocab_size": len(tok),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "cases": cases,
            "encodes": encodes,
        }

    qtok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "qwen2.5"))
    custom_msgs = {
        "parts": [
            {"role": "system", "content": "plain string"},
            {"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image", "url": "x.png"},
                                         {"type": "text", "text": " ok?"}]},
        ],
        "pymethods": [
            {"role": "user", "content": "  Hi there, how are you?\nsecond line  ", "meta": {"b": 1, "a": "x"}},
            {"role": "assistant", "content": "banana split"},
            {"role": "user", "content": "Hi?"},
            {"role": "user", "content": "never shown"},
        ],
        "tojson": [
            {"role": "user", "content": "a \"quoted\" <tag> & 'apos' é 🙂 \\ back\n",
             "n": 3, "f": 2.5, "whole": 1.0, "t": True, "z": None, "list": [1, "two", [3], {}], "empty": []},
        ],
        "namespace_loop": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
        ],
    }
    for cname, tmpl in CUSTOM.items():
        for agp in (False, True):
            msgs = custom_msgs[cname]
            text = qtok.apply_chat_template(msgs, chat_template=tmpl, tokenize=False, add_generation_prompt=agp)
            expected["custom"].append({"name": cname, "template": tmpl, "messages": msgs,
                                       "add_generation_prompt": agp, "text": text})

    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", ROOT, file=sys.stderr)


if __name__ == "__main__":
    main()
