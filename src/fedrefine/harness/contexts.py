"""What lm-eval hands a model, as FedRefine prompts: a context string, and (with ``--apply_chat_template``) the
conversation it was rendered from.

lm-eval renders a conversation through the model's :meth:`apply_chat_template` and then passes only the rendered
string back with each request. :class:`ChatContexts` renders with the receiver's own template (as FedRefine's
evaluation does) and remembers each rendering's conversation, so that a request's context can be read again as
messages: senders render the same conversation with their own templates, T2T places hints in it.

A context ends where lm-eval's ``hf`` model makes it end: whitespace at its end moves into every continuation
(:func:`split_trailing_space`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from fedrefine.participants import Participant
from fedrefine.participants.chat import EncodedChat, Message, encode_chat, render_chat


class FormatError(ValueError):
    """A task format that a route cannot answer as its fusers were trained; the message names the setting."""


@dataclass(frozen=True)
class Context:
    """One request's context: its text, and the conversation it renders (None: plain text, no chat template)."""

    text: str
    messages: tuple[Message, ...] | None = None
    add_generation_prompt: bool = True

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def prefilled(self) -> bool:
        """The conversation ends in an assistant message that the answer continues (lm-eval's ``gen_prefix``)."""
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    def last_user_content(self) -> str:
        """The text of the last user message (what T2T senders are asked about)."""
        return next(m["content"] for m in reversed(self.messages or ()) if m["role"] == "user")


class ChatContexts:
    """Renders lm-eval's conversations with the receiver's chat template and finds them again by their text.

    Args:
        receiver: whose template renders the conversations (the model that answers).
    """

    def __init__(self, receiver: Participant) -> None:
        self.receiver = receiver
        self._rendered: dict[str, Context] = {}

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as the receiver's prompt (a final assistant message is continued)."""
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)
        try:
            text = render_chat(self.receiver, messages, add_generation_prompt)[0]
        except (ValueError, TemplateError) as err:  # e.g. a template without a system role, or one that edits content
            raise FormatError(
                f"The receiver's chat template cannot render lm-eval's conversation ({err}); drop --system_instruction "
                f"or --fewshot_as_multiturn, or use another template."
            ) from err
        self._rendered[text] = Context(text, messages, add_generation_prompt)
        return text

    def context(self, text: str) -> Context:
        """The request context ``text``: a conversation rendered here, else plain text."""
        return self._rendered.get(text) or Context(text)


def split_trailing_space(text: str) -> tuple[str, str]:
    """``text`` without the whitespace at its end, and that whitespace (which lm-eval's ``hf`` model moves to the
    start of each continuation)."""
    stripped = text.rstrip()
    return stripped, text[len(stripped) :]


def encode_context(participant: Participant, context: Context, add_special_tokens: bool) -> EncodedChat:
    """The context as ``participant`` reads it: its conversation in the participant's own template (chat), or the
    plain text (``add_special_tokens`` as lm-eval's ``hf`` model would), without trailing whitespace."""
    if context.chat:
        chat = encode_chat(participant, context.messages, context.add_generation_prompt)
        text, spans, contents = chat.text, chat.content_spans, chat.contents
    else:
        text, spans, contents = context.text, [(0, len(context.text))], [context.text]
    text, _ = split_trailing_space(text)
    add = add_special_tokens and not context.chat  # a rendered chat holds its own special tokens
    encoding = participant.tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
    spans = [(min(start, len(text)), min(end, len(text))) for start, end in spans]
    return EncodedChat(text, list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]], spans, contents)


def adds_special_tokens(participant: Participant, text: str) -> bool:
    """Whether lm-eval's ``hf`` model lets the tokenizer add its special tokens to ``text``: unless the text already
    starts with the token it conditions on (BOS, else EOS)."""
    tokenizer = participant.tokenizer
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return prefix is None or not text.startswith(tokenizer.decode(prefix))
