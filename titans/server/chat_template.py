"""The chat template of /v1/chat/completions.

Each message becomes one line `"{role}: {content}\\n"`, and the prompt ends with
`"assistant:"`, so the model writes the assistant's turn. For example the messages
`[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]` become

    system: Be brief.
    user: Hi
    assistant:

Generation stops at `"\\nuser:"`, the start of a next user turn, which the reply excludes.
Roles are system, developer, user and assistant. A message's content is a string or a
list of `{"type": "text", "text": ...}` parts, which are joined without a separator.

With a session (X-Session-Id), send only the new messages, because the session's memory
already contains the earlier turns.
"""

from __future__ import annotations

CHAT_ROLES = ("system", "developer", "user", "assistant")
CHAT_STOP = "\nuser:"
ASSISTANT_PREFIX = "assistant:"


def render_chat(messages: list[tuple[str, str]]) -> str:
    """Render (role, content) pairs with the template; the roles must be in CHAT_ROLES."""
    lines = [f"{role}: {content}\n" for role, content in messages]
    return "".join(lines) + ASSISTANT_PREFIX
