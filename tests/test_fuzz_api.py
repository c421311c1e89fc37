"""schemathesis against the live edge and cloud (loopback HTTP), from the documents they serve.

Both services run for real in this process (werkzeug's threaded server on
127.0.0.1): the edge over the live cloud through its ordinary HTTP cloud
client, the default model registered and pushed. Each operation gets a
bounded number of generated requests (``N_EXAMPLES``; a few hundred in all),
sent with the shared token (the cloud) or the admin token (the edge: its writes need it). Checked: no 5xx, and every status, content type
and body conforms to the document.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from cloud_api import create_app as create_cloud_app
from conftest import edge_config, running_edge
from live_server import serve

pytestmark = pytest.mark.slow

N_EXAMPLES = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_services(tmp_path_factory, token):
    """(edge URL, cloud URL): both apps served on loopback for the module."""
    root = tmp_path_factory.mktemp("fuzz")
    cloud_app = create_cloud_app({"token": token, "state_dir": str(root / "cloud")})
    with serve(cloud_app) as cloud_url:
        config = edge_config(token, root / "edge", cloud_url=cloud_url)
        with running_edge(config, None) as edge_app, serve(edge_app) as edge_url:
            from edge_api import get_node
            assert get_node(edge_app).preparation.wait_idle(120.0)
            yield edge_url, cloud_url


def _fuzz(schema_url: str, token: str) -> int:
    """Run every operation of the document at ``schema_url`` under hypothesis; the number of cases sent.

    (schemathesis' own pytest plugin does not run under this pytest, so the
    operations are driven with hypothesis directly: the same generation and checks.)
    """
    schema = schemathesis.openapi.from_url(schema_url)
    n_cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, phases=[Phase.explicit, Phase.generate])
        def run(case):
            nonlocal n_cases
            n_cases += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30)

        run()
    return n_cases


def test_the_edge_conforms_to_its_document(live_services, admin_token):
    assert _fuzz(live_services[0] + "/api/v1/openapi.json", admin_token) >= 100


def test_the_cloud_conforms_to_its_document(live_services, token):
    assert _fuzz(live_services[1] + "/api/v1/openapi.json", token) >= 50
