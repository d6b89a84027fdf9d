"""The Hugging Face Hub connection shared by dataset and model publishing: the token and a fast preflight.

``resolve_token`` and ``check_hub_access`` are called before any long work, so a missing token
or an unreachable Hub fails in seconds, not after building a dataset or training a model. The
token is never logged, printed or written anywhere.
"""
import logging
import threading
from typing import Callable, Optional, TypeVar

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from .errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar('T')

HUB_TIMEOUT_S = 10.0
NO_TOKEN_MESSAGE = 'No Hugging Face token found: set HF_TOKEN or run `hf auth login`, or use --dry_run'


class HubError(UserError):
    """The Hub cannot be used right now (no token, token rejected, Hub unreachable)."""


def resolve_token(token: Optional[str] = None) -> str:
    """The Hub token to use: the argument, else HF_TOKEN or the one stored by ``hf auth login``.

    Args:
        token: an explicit token, or None to look it up.

    Returns:
        The token.

    Raises:
        HubError: no token anywhere.
    """
    token = token or get_token()
    if not token:
        raise HubError(NO_TOKEN_MESSAGE)
    return token


def _short_reason(error: BaseException) -> str:
    """The first line of an error message, cut to 200 characters (never includes headers)."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    return reason[:200]


def _call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """Runs ``fn`` in a daemon thread and waits at most ``timeout_s`` seconds for it.

    The Hub client has no timeout on its own session, so a network that drops packets would hang a
    preflight forever; a daemon thread that is given up on does not keep the process alive.
    """
    outcome = {}

    def target():
        try:
            outcome['value'] = fn()
        except BaseException as e:  # handed to the caller below
            outcome['error'] = e

    thread = threading.Thread(target=target, name='hub-preflight', daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f'no answer within {timeout_s:g} s')
    if 'error' in outcome:
        raise outcome['error']
    return outcome['value']


def validate_hub_repo_id(repo_id: str) -> None:
    """Raises ValueError naming --repo_id when ``repo_id`` is not a valid Hub repository id."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f'Invalid --repo_id {repo_id!r}: {_short_reason(e)} Use the form "user/name".') from e


def check_hub_access(repo_id: str, token: str, *, timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Fast preflight before any long work: is ``repo_id`` valid, the Hub reachable, the token accepted?

    Args:
        repo_id: the repository to push to, "user/name".
        token: the Hub token (see ``resolve_token``).
        timeout_s: how long to wait for the Hub.

    Raises:
        ValueError: ``repo_id`` is malformed.
        HubError: the Hub cannot be reached, or it rejects the token.
    """
    validate_hub_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        user = _call_with_timeout(lambda: api.whoami(), timeout_s)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubError(
                f'The token was rejected by the Hugging Face Hub ({api.endpoint}, HTTP {status}): create a '
                'token with write access at https://huggingface.co/settings/tokens, then set HF_TOKEN or run '
                '`hf auth login`, or use --dry_run.') from e
        raise HubError(f'The Hugging Face Hub ({api.endpoint}) answered HTTP {status}: {_short_reason(e)}. '
                       'Try again later or use --dry_run.') from e
    except (HTTPError, OSError, TimeoutError) as e:
        # HTTPError: the Hub client's transport errors (connection refused, DNS, TLS, timeouts).
        raise HubError(f'Cannot reach the Hugging Face Hub ({api.endpoint}): {_short_reason(e)}. '
                       'Check your network or use --dry_run.') from e
    logger.info('Hub access checked: logged in as %s', user.get('name', '?'))
