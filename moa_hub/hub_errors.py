"""Turn huggingface_hub / httpx failures into one clear sentence: what failed and what to do next.

The token is never part of a message: every text passes through ``scrub`` before it is shown.
"""

from __future__ import annotations

import os

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN (or pass --token)"


def scrub(text: str, token: str | None = None) -> str:
    """Remove every token we know of from ``text``."""
    from huggingface_hub import get_token

    for secret in {token, get_token(), os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def explain_hub_error(
    err: Exception,
    repo_id: str,
    action: str,
    offline: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """One message for a failed ``action`` ("download", "push") on ``repo_id``."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    endpoint = endpoint or constants.ENDPOINT
    if isinstance(err, hf.GatedRepoError):
        msg = (
            f"{repo_id} is gated: request access at {endpoint}/{repo_id}, wait for approval, then {LOGIN_HINT} "
            "with the account that has access."
        )
    elif isinstance(err, hf.RevisionNotFoundError):
        msg = f"{repo_id} has no revision like that ({_first_line(err)}): check --revision (branch, tag or commit)."
    elif isinstance(err, hf.RepositoryNotFoundError):
        msg = (
            f"{repo_id} was not found, or it is private and the token cannot see it. Check the id; "
            f"for a private repo, {LOGIN_HINT} with an account that can read it."
        )
    elif isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) or (offline and action == "download"):
        msg = (
            f"{repo_id} is not in the local cache and the Hub cannot be used (HF_HUB_OFFLINE=1 or no network). "
            "Run once online to fill the cache (or pass a local folder), then retry."
        )
    elif _status(err) == 401:
        msg = f"the Hub rejected the token (401 Unauthorized) for {repo_id}: {LOGIN_HINT} with a valid token."
    elif _status(err) == 403:
        msg = (
            f"the token may not {action} {repo_id} (403 Forbidden): use a token with write access to "
            f"that namespace (a 'write' or fine-grained token), or another --repo-id."
        )
    elif isinstance(err, (httpx.ConnectError, httpx.TimeoutException, httpx.NetworkError)):
        msg = f"cannot reach the Hub at {endpoint} ({type(err).__name__}): check the network, proxy and HF_ENDPOINT."
    elif isinstance(err, hf.HfHubHTTPError):
        msg = f"the Hub answered {_status(err)} for {repo_id}: {_first_line(err)}"
    else:
        msg = f"{type(err).__name__}: {_first_line(err)}"
    return scrub(f"Could not {action} {repo_id}: {msg}", token)
