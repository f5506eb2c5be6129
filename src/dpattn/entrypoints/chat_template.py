"""Chat templates: `--chat-template NAME|FILE`, a built-in turn format, or the tokenizer's own.

The packaged default model (Gemma 3 270M, converted from GGUF) is the *base* model and its
tokenizer carries no template, so chat would be impossible; it gets Gemma's standard turn format
(the one the instruction-tuned Gemma 3 ships), and the server says once at start-up that answers
come from a base model. A tokenizer that has a template keeps it unless --chat-template is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpattn.models.gguf_convert import is_converted

logger = logging.getLogger(__name__)

# Gemma 3's own chat template (a system message is folded into the first user turn).
GEMMA = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim }}\n"
    "    {{- '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{ '<start_of_turn>model\\n' }}\n"
    "{%- endif -%}\n"
)

BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (Jinja source, tokens that end the model's turn: generation stops there)
    "gemma": (GEMMA, ("<end_of_turn>",)),
}


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # a built-in name, a file path, or "tokenizer"
    source: str  # Jinja, rendered by the tokenizer's apply_chat_template
    stop_tokens: tuple[str, ...] = ()

    @property
    def knows_tools(self) -> bool:
        """The template renders `tools` (and tool calls / results) itself, as HF templates that
        support tools do; else tool_prompt.py describes them in a system message."""
        return "tools" in self.source

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the end-of-turn tokens the tokenizer knows (one token each)."""
        ids = []
        for tok in self.stop_tokens:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != tokenizer.unk_token_id:
                ids.append(i)
        return ids

    def render(
        self,
        tokenizer: Any,
        messages: list[dict[str, Any]],
        continue_final: bool = False,
        variables: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt, ending with the assistant turn's opening. continue_final (SGLang's
        continue_final_message): a last assistant message is left open, its text the end of the
        prompt, for the model to continue; variables: extra template variables (SGLang's
        chat_template_kwargs); tools: the request's tools, OpenAI's form (knows_tools only)."""
        tail = ""
        if continue_final and messages and messages[-1]["role"] == "assistant":
            messages, tail = messages[:-1], messages[-1]["content"]
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=self.source,
            tokenize=False,
            add_generation_prompt=True,
            **{**(variables or {}), **({"tools": tools} if tools else {})},
        )
        return str(text) + tail


def resolve_chat_template(spec: str | None, tokenizer: Any, model_path: str) -> ChatTemplate | None:
    """The template the server uses: spec (built-in name or file), else the tokenizer's, else
    Gemma's for the packaged base Gemma; None: this model has no chat."""
    if spec is not None:
        if spec in BUILTIN:
            return ChatTemplate(spec, *BUILTIN[spec])
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(
                f"--chat-template {spec} is neither a built-in ({', '.join(BUILTIN)}) nor a file"
            )
        return ChatTemplate(str(path), path.read_text())
    if tokenizer is None:
        return None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return ChatTemplate("tokenizer", own)
    if is_converted(Path(model_path)):
        logger.info(
            "the default model (Gemma 3 270M) is a base model, not instruction-tuned: chat uses "
            "Gemma's turn format and answers are continuations; --chat-template to change it"
        )
        return ChatTemplate("gemma", *BUILTIN["gemma"])
    return None
