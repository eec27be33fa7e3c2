"""passenger_wsgi.py served by a real Apache + mod_passenger under /api, as on a cPanel host."""
from __future__ import annotations

import re

import pytest
import requests



@pytest.fixture(scope="module")
def site(passenger_site):
    """One site on a migrated SQLite database in its instance folder."""
    return passenger_site({"SECRET_KEY": "passenger-smoke"}, sqlite=True)


def test_api_without_a_key_is_an_openai_401(site):
    response = requests.get(f"{site.url}/v1/models", timeout=30)
    assert response.status_code == 401, site.logs()
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]


def test_pages_build_urls_under_the_base_uri(site):
    response = requests.get(f"{site.url}/login", timeout=30)
    assert response.status_code == 200, site.logs()
    page = response.text
    actions = re.findall(r'<form[^>]*action="([^"]*)"', page)
    links = re.findall(r'(?:href|src)="(/[^"]*)"', page)
    # The sign-in form has no action (it posts back to its own /api/login); any other must be under /api.
    assert links
    assert all(url.startswith("/api/") for url in actions + links), actions + links
    stylesheet = next(url for url in links if url.endswith(".css"))
    assert requests.get(f"http://127.0.0.1:{site.port}{stylesheet}", timeout=30).status_code == 200
