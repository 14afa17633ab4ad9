"""Create data repository associations through boto3, and wait for them to become AVAILABLE.

Credentials come only from boto3's default chain (environment, shared config, instance
profile); nothing here reads or prints them. Every botocore failure becomes one
``DraAwsError`` line with an exit status: 2 for local setup (no credentials, no region),
1 for what AWS or the network answered.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from cluster.fsx_dra import DraPlan, render_request

CREATE = "CreateDataRepositoryAssociation"
DESCRIBE = "DescribeDataRepositoryAssociations"
ACCESS_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnrecognizedClientException",
                 "InvalidClientTokenId", "ExpiredToken", "ExpiredTokenException"}
BROKEN = {"FAILED", "MISCONFIGURED", "DELETING"}
NO_REGION = "no AWS region configured; fix: pass --region (e.g. us-east-1) or set AWS_REGION"


class DraAwsError(Exception):
    def __init__(self, message: str, exit_code: int, created: Sequence[dict[str, Any]] = ()):
        super().__init__(message)
        self.exit_code = exit_code
        self.created = list(created)


def make_client(region: str | None, endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = region or session.region_name
    if not region:  # botocore would build "fsx..amazonaws.com" from an empty AWS_REGION
        raise DraAwsError(NO_REGION, 2)
    try:
        return session.client("fsx", region_name=region, endpoint_url=endpoint_url,
                              config=Config(connect_timeout=10, read_timeout=60, retries={"mode": "standard"}))
    except ValueError as exc:  # botocore's "Invalid endpoint"
        raise DraAwsError(f"cannot build the FSx client: {exc}; fix: check --region and --endpoint-url", 2) from exc
    except Exception as exc:  # botocore's own errors, turned into one line
        raise aws_error(exc, CREATE, endpoint_url) from exc


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(re.sub(r"<[^>]+>", " ", text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def aws_error(exc: Exception, action: str, endpoint_url: str | None) -> DraAwsError:
    """One line that says what failed and how to fix it; never includes credentials."""
    from botocore import exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return DraAwsError("no AWS credentials found (boto3 looked in the environment, ~/.aws and the instance "
                           f"profile); fix: run on a node whose role allows fsx:{action}, or set AWS_PROFILE", 2)
    if isinstance(exc, bx.NoRegionError):
        return DraAwsError(NO_REGION, 2)
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = _one_line(str(error.get("Message", "")))
        if code in ACCESS_DENIED:
            return DraAwsError(f"AWS denied fsx:{action} ({code}): {message}; fix: give the role in use "
                               f"fsx:{action} and the S3/IAM permissions the FSx Lustre guide lists", 1)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return DraAwsError(f"{action} failed ({code}, HTTP {status}): {message}", 1)
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
        where = endpoint_url or "the regional FSx endpoint"
        return DraAwsError(f"cannot reach {where} ({_one_line(str(exc))}); fix: check --region, --endpoint-url "
                           "and the network route (VPC endpoint or NAT) to FSx", 1)
    if isinstance(exc, bx.ParamValidationError):
        return DraAwsError(f"{action} request rejected by botocore: {_one_line(str(exc))}", 2)
    if isinstance(exc, bx.BotoCoreError):
        return DraAwsError(f"{action} failed: {_one_line(str(exc))}", 1)
    raise exc


def create_associations(client: Any, plan: DraPlan) -> list[dict[str, Any]]:
    """Create each association in order; on a failure, the error lists the ones already made."""
    from botocore.exceptions import BotoCoreError, ClientError

    created: list[dict[str, Any]] = []
    for assoc in plan.associations:
        try:
            response = client.create_data_repository_association(**render_request(plan, assoc))
        except (BotoCoreError, ClientError) as exc:
            error = aws_error(exc, CREATE, plan.endpoint_url)
            error.created = created
            raise error from exc
        created.append(response["Association"])
    return created


def wait_available(client: Any, ids: Sequence[str], timeout_s: float, poll_s: float,
                   endpoint_url: str | None = None, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Poll until every association is AVAILABLE; FAILED/MISCONFIGURED/DELETING or the timeout raise."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = clock() + timeout_s
    while True:
        try:
            found = client.describe_data_repository_associations(AssociationIds=list(ids))["Associations"]
        except (BotoCoreError, ClientError) as exc:
            raise aws_error(exc, DESCRIBE, endpoint_url) from exc
        by_id = {a["AssociationId"]: a for a in found}
        for assoc_id in ids:
            assoc = by_id.get(assoc_id)
            lifecycle = assoc.get("Lifecycle") if assoc else "MISSING"
            if assoc is None or lifecycle in BROKEN:
                details = (assoc or {}).get("FailureDetails", {}).get("Message", "no details")
                raise DraAwsError(f"association {assoc_id} is {lifecycle}: {_one_line(details)}; fix the cause, "
                                  f"delete it (aws fsx delete-data-repository-association --association-id "
                                  f"{assoc_id}) and create it again", 1)
        if all(by_id[i]["Lifecycle"] == "AVAILABLE" for i in ids):
            return [by_id[i] for i in ids]
        if clock() >= deadline:
            states = ", ".join(f"{i} {by_id[i]['Lifecycle']}" for i in ids)
            raise DraAwsError(f"associations not AVAILABLE after {timeout_s:g} s ({states}); they keep being "
                              "created: check later with aws fsx describe-data-repository-associations", 1)
        sleep(max(0.0, min(poll_s, deadline - clock())))
