"""Where the agent reaches AWS: region and endpoint, shared by the ``aws-secretsmanager``
source and the AWS Secrets Manager rotation store.

Credentials are never configured here: the AWS client resolves them the standard way
(environment, web identity / IRSA, container and instance profiles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.configkit import Section, as_http_url, as_str, show_value


@dataclass(frozen=True)
class AwsConfig:
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / the profile's
    endpoint_url: str | None = None  # tests, VPC endpoints, LocalStack-style servers


def _region(value: object) -> str:
    text = as_str(value)
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", text):
        raise ValueError(f"{show_value(text)} is not an AWS region (like eu-west-1)")
    return text


def parse_aws(section: Section) -> AwsConfig:
    """``region`` and ``endpoint_url`` of ``section`` (a source or a store mapping)."""
    return AwsConfig(
        region=section.get("region", _region, None),
        endpoint_url=section.get("endpoint_url", as_http_url, None),
    )
