"""Chat templates: an instruction-tuned checkpoint's prompt format, applied as transformers
applies it (`apply_chat_template(messages, add_generation_prompt=True)`).

The template is the checkpoint's `chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates of which "default" is taken). It is
rendered in a sandboxed Jinja environment with the options transformers renders with
(trim_blocks, lstrip_blocks, loop controls; `raise_exception`, `strftime_now` and a
`tojson` filter), given `messages`, `add_generation_prompt` and the special tokens of
`tokenizer_config.json` (bos_token, eos_token, ...); the text is then tokenized without
adding special tokens (the template writes them).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..errors import ConfigError, InputError
from ..models.checkpoint import read_json
from ..models.weights import probe

TEMPLATE_FILE, TOKENIZER_CONFIG = "chat_template.jinja", "tokenizer_config.json"
MAX_TEMPLATE = 1_000_000  # bytes


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_template(directory) -> tuple[str, dict] | None:
    """(template text, special tokens) of a checkpoint directory, or None without a template."""
    d = Path(directory)
    config = {}
    if probe(d / TOKENIZER_CONFIG) is not None:
        config = read_json(d / TOKENIZER_CONFIG, "tokenizer config")
        if not isinstance(config, dict):
            raise ConfigError(f"tokenizer config {d / TOKENIZER_CONFIG} must be a JSON object")
    specials = {k: t for k, v in config.items()
                if k.endswith("_token") and (t := _token_text(v)) is not None}
    if probe(d / TEMPLATE_FILE) is not None:
        from ..models.weights import regular_file

        if regular_file(d / TEMPLATE_FILE, "chat template") > MAX_TEMPLATE:
            raise ConfigError(f"chat template {d / TEMPLATE_FILE} is larger than {MAX_TEMPLATE} "
                              f"bytes")
        return (d / TEMPLATE_FILE).read_text(encoding="utf-8"), specials
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ConfigError(f"tokenizer config {d / TOKENIZER_CONFIG}: chat_template must be a "
                          f"string or a list of named templates")
    return template, specials


def render(template: str, messages: list, specials: dict,
           add_generation_prompt: bool = True) -> str:
    """The template's text for `messages` (a list of {"role": ..., "content": ...})."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InputError("messages must be a list of {'role': str, 'content': ...} objects")

    def raise_exception(message):
        raise InputError(f"the chat template refused the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **specials)
    except jinja2.TemplateError as e:
        raise ConfigError(f"the chat template cannot be rendered: {str(e)[:200]}") from None


def chat_ids(tokenizer, directory, messages: list) -> list[int]:
    """The token ids of `messages` in the checkpoint's chat format, ready for generation."""
    found = load_template(directory)
    if found is None:
        raise ConfigError(f"{directory} has no chat template ({TEMPLATE_FILE}, or chat_template "
                          f"in {TOKENIZER_CONFIG})")
    text = render(found[0], messages, found[1])
    return tokenizer.encode(text, add_special_tokens=False).ids
