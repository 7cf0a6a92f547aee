"""Hub commands: ``moa-hub push DIR`` and ``moa-hub init-workflow``."""

from __future__ import annotations

from pathlib import Path

import typer

PUSH_HELP = """Push an exported MoA folder to the Hub in one atomic commit.

Weights identical to the base model's are copied on the Hub (no re-upload); a re-run only commits what
changed. The token comes from HF_TOKEN or `hf auth login` unless --token is given.

Examples:

  moa-hub push llama-moa --repo-id you/Llama-3.1-8B-Instruct-MoA

  moa-hub push llama-moa --repo-id you/llama-moa --private --dry-run

  moa-hub push llama-moa --repo-id org/llama-moa --create-pr
"""

WORKFLOW_HELP = """Write a GitHub Actions workflow that runs conversions (workflow_dispatch) into a repository.

Example: moa-hub init-workflow . && git add .github/workflows/moa-convert.yml
"""


def push(
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder written by moa-hub export/convert."),
    repo_id: str = typer.Option(..., "--repo-id", help="Target repo, e.g. you/Llama-3.1-8B-Instruct-MoA."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str = typer.Option(None, "--revision", help="Branch to push to (created when missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of pushing to the branch."),
    token: str = typer.Option(
        None, "--token", help="Hub token (default: HF_TOKEN or the saved login).", show_default=False
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commit plan; change nothing."),
) -> None:
    from ..push import PushConfig, push_folder

    config = PushConfig(
        repo_id=repo_id, private=private, revision=revision, create_pr=create_pr, token=token or None, dry_run=dry_run
    )
    result = push_folder(folder, config)
    for item in result.files:
        typer.echo(f"{item.action:9s} {item.path_in_repo}" + (f"  <- {item.source}" if item.source else ""))
    if result.dry_run:
        typer.echo(f"dry run: nothing pushed to {result.repo_url}")
    elif result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")
    else:
        typer.echo(
            f"pushed: {result.repo_url}" + (f" (commit {result.commit_sha})" if result.commit_sha else " (no changes)")
        )


def init_workflow(
    repo_root: Path = typer.Argument(Path("."), help="Root of the git repository to add the workflow to."),
    path: Path = typer.Option(
        Path(".github/workflows/moa-convert.yml"), "--path", help="Where to write it, relative to the root."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    from ..workflow import WorkflowConfig
    from ..workflow import init_workflow as write_workflow

    typer.echo(f"wrote {write_workflow(repo_root, WorkflowConfig(path=path, force=force))}")


def register(app: typer.Typer) -> None:
    app.command("push", help=PUSH_HELP)(push)
    app.command("init-workflow", help=WORKFLOW_HELP)(init_workflow)
