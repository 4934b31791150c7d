"""From token ids to the text a text app answers with: the prompt a chat renders to, stop strings, and
the pieces a stream may send so far (serve_apps/speculative.py and serve_apps/retrieval.py).

The project's base models have no chat template; they get a plain one ("User: ...", "Assistant:"),
and a chat rendered with it stops where the model starts the user's next turn.
"""

from typing import Any

# {role}: {content} per message, then the assistant's cue; a tokenizer's own template wins.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = "\nUser:"
INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


def render_prompt(tokenizer: Any, text_input: str | list[dict[str, str]]) -> tuple[str, list[str]]:
    """(prompt text, stop strings the rendering adds): a prompt as it is, a chat through the template."""
    if isinstance(text_input, str):
        return text_input, []
    own = getattr(tokenizer, "chat_template", None)
    text = tokenizer.apply_chat_template(
        text_input, chat_template=own or DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    return text, [] if own else [DEFAULT_CHAT_STOP]


class TextStream:
    """The generated ids of one request and their text, cut before the first stop string.

    `add(ids)` returns the text that became final: it holds back a trailing half character and any
    tail that may still grow into a stop string, so the streamed pieces always add up to `text`.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer, self._stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string was reached: the text ends before it
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in ids)
        text = self._decode(self.ids)
        cuts = [text.find(s) for s in self._stop if s in text]
        if cuts:
            self.stopped, self.text = True, text[: min(cuts)]
            final = len(self.text)
        else:
            self.text = text
            final = len(text) - self._held_back(text)
        delta = self.text[self._sent : final]
        self._sent = max(self._sent, final)
        return delta

    def rest(self) -> str:
        """What was held back, once generation ended."""
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _held_back(self, text: str) -> int:
        hold = len(text) - len(text.rstrip(INCOMPLETE))
        for s in self._stop:  # the longest tail that starts a stop string
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0))
        return hold

    def completion_tokens(self) -> int:
        """Tokens of the answered text: all of them, or those up to the stop string."""
        if not self.stopped:
            return len(self.ids)
        cut = len(self.text)
        return next(i for i in range(len(self.ids) + 1) if len(self._decode(self.ids[:i])) >= cut)
