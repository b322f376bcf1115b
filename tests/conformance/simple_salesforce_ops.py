"""Exercises the emulator with simple-salesforce (PyPI), unmodified, over TLS.

Each step checks the answer against what Salesforce documents and prints one JSON line on
stdout, {"step": ..., ...}; tests/conformance.rs checks that every step ran and compares what
it reports with the org. Any failure prints {"step": "failed", ...} and exits 1.

Environment (set by tests/conformance.rs):
  SFM_INSTANCE_URL   https://127.0.0.1:PORT
  SFM_CLIENT_ID, SFM_CLIENT_SECRET   the connected app (client-credentials login)
  SFM_API_VERSION    e.g. 62.0
  SFM_SEEDED         how many "Seed" accounts the test created before starting
  REQUESTS_CA_BUNDLE the emulator's CA (requests reads it)
"""

import datetime
import json
import os
import sys
import traceback

import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceMalformedRequest,
    SalesforceMoreThanOneRecord,
    SalesforceResourceNotFound,
)

current = "connect"


def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def main():
    global current
    instance = os.environ["SFM_INSTANCE_URL"]
    version = os.environ["SFM_API_VERSION"]
    seeded = int(os.environ["SFM_SEEDED"])

    current = "login"
    # simple-salesforce's own logins go to <domain>.salesforce.com; the token comes from the
    # emulator's OAuth endpoint and the client runs with it, as with any externally issued
    # session.
    token = requests.post(
        f"{instance}/services/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": os.environ["SFM_CLIENT_ID"],
            "client_secret": os.environ["SFM_CLIENT_SECRET"],
        },
        timeout=30,
    )
    check(token.status_code == 200, f"token: {token.status_code} {token.text}")
    token = token.json()
    sf = Salesforce(
        instance_url=token["instance_url"], session_id=token["access_token"], version=version
    )
    emit("login", instance=sf.sf_instance)

    current = "describe-global"
    glob = sf.describe()
    names = [o["name"] for o in glob["sobjects"]]
    check("Account" in names and "Invoice__c" in names, f"global describe: {names}")
    emit("describe-global", names=names)

    current = "describe"
    d = sf.Account.describe()
    check(d["name"] == "Account", d["name"])
    emit("describe", name=d["name"], fields=len(d["fields"]))

    current = "basic-info"
    info = sf.Account.metadata()
    check(info["objectDescribe"]["name"] == "Account", info)
    check(info["recentItems"] == [], info)
    emit("basic-info", keyPrefix=info["objectDescribe"]["keyPrefix"])

    current = "limits"
    limits = sf.limits()
    check(limits["DailyApiRequests"]["Max"] > 0, limits)
    emit("limits", daily=limits["DailyApiRequests"])

    current = "create"
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    created = sf.Account.create({"Name": "simple-salesforce", "Phone": "555-0100"})
    check(created["success"] is True and created["errors"] == [], created)
    account_id = created["id"]
    check(len(account_id) == 18, account_id)
    emit("create", id=account_id)

    current = "get"
    rec = sf.Account.get(account_id)
    check(list(rec.keys())[0] == "attributes", list(rec.keys())[:3])
    check(rec["attributes"]["type"] == "Account", rec["attributes"])
    check(rec["Name"] == "simple-salesforce" and rec["Phone"] == "555-0100", rec)
    short = sf.Account.get(account_id[:15])
    check(short["Id"] == account_id, short["Id"])
    emit("get", name=rec["Name"])

    current = "update"
    status = sf.Account.update(account_id, {"Phone": "555-0199"})
    check(status == 204, status)
    emit("update", status=status)

    current = "upsert"
    status = sf.Invoice__c.upsert("External_Id__c/PY-1", {"Name": "From Python"})
    check(status == 201, status)
    again = sf.Invoice__c.upsert("External_Id__c/PY-1", {"Name": "From Python, again"})
    # From API 46.0 an upsert that updates answers 200 with a body; simple-salesforce
    # returns the status code.
    check(again == 200, again)
    by_ext = sf.Invoice__c.get_by_custom_id("External_Id__c", "PY-1")
    check(by_ext["Name"] == "From Python, again", by_ext)
    emit("upsert", created=status, updated=again, id=by_ext["Id"])

    current = "query"
    q = sf.query("SELECT Id, Name, Phone FROM Account WHERE Id = '%s'" % account_id)
    check(q["totalSize"] == 1 and q["done"] is True, q)
    check(q["records"][0]["Phone"] == "555-0199", q["records"])
    emit("query", totalSize=q["totalSize"])

    current = "query-more"
    first = sf.query(
        "SELECT Id, Name FROM Account WHERE Name LIKE 'Seed%'",
        headers={"Sforce-Query-Options": "batchSize=200"},
    )
    check(first["done"] is False and len(first["records"]) == 200, first["done"])
    check(first["totalSize"] == seeded, first["totalSize"])
    page2 = sf.query_more(first["nextRecordsUrl"], identifier_is_url=True)
    check(len(page2["records"]) == 200, len(page2["records"]))
    locator = first["nextRecordsUrl"].rsplit("/", 1)[-1]
    page2b = sf.query_more(locator)
    check(page2b["records"] == page2["records"], "a locator is as good as the URL")
    emit("query-more", pages=2)

    current = "query-all"
    everything = sf.query_all("SELECT Id, Name FROM Account WHERE Name LIKE 'Seed%'")
    check(everything["totalSize"] == seeded, everything["totalSize"])
    check(len(everything["records"]) == seeded, len(everything["records"]))
    emit("query-all", records=len(everything["records"]))

    current = "delete"
    doomed = sf.Account.create({"Name": "doomed"})["id"]
    status = sf.Account.delete(doomed)
    check(status == 204, status)
    try:
        sf.Account.get(doomed)
        raise AssertionError("a deleted record is still there")
    except SalesforceResourceNotFound as e:
        check(e.content[0]["errorCode"] == "ENTITY_IS_DELETED", e.content)
    deleted = sf.query_all("SELECT Id FROM Account WHERE Id = '%s'" % doomed, include_deleted=True)
    check(deleted["totalSize"] == 1, deleted)
    emit("delete", id=doomed)

    current = "updated-deleted"
    end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
    upd = sf.Account.updated(before, end)
    check(account_id in upd["ids"], upd)
    check(doomed not in upd["ids"], upd)
    dele = sf.Account.deleted(before, end)
    check([r["id"] for r in dele["deletedRecords"]] == [doomed], dele)
    emit("updated-deleted", updated=upd["ids"], deleted=[r["id"] for r in dele["deletedRecords"]])

    current = "bulk2"
    chunks = list(sf.bulk2.Account.query("SELECT Id, Name FROM Account WHERE Name LIKE 'Seed%'"))
    rows = sum(len(c.strip().splitlines()) - 1 for c in chunks)
    check(rows == seeded, f"{rows} rows")
    check(chunks[0].startswith('"Id","Name"'), chunks[0][:40])
    emit("bulk2", rows=rows)

    current = "errors"
    try:
        sf.Account.get("001000000000000")
        raise AssertionError("an unknown id was found")
    except SalesforceResourceNotFound as e:
        check(e.content[0]["errorCode"] == "NOT_FOUND", e.content)
    try:
        sf.Account.get("not-an-id")
        raise AssertionError("a malformed id was accepted")
    except SalesforceMalformedRequest as e:
        check(e.content[0]["errorCode"] == "MALFORMED_ID", e.content)
    try:
        sf.query("SELECT Nope__c FROM Account")
        raise AssertionError("an unknown field was accepted")
    except SalesforceMalformedRequest as e:
        check(e.content[0]["errorCode"] == "INVALID_FIELD", e.content)
    sf.Invoice__c.create({"Name": "twin", "External_Id__c": "PY-2"})
    sf.Invoice__c.create({"Name": "twin", "External_Id__c": "PY-2"})
    try:
        sf.Invoice__c.get_by_custom_id("External_Id__c", "PY-2")
        raise AssertionError("two matches were one")
    except SalesforceMoreThanOneRecord as e:
        check(len(e.content) == 2, e.content)
    emit("errors")

    emit("done")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        emit("failed", at=current, error=repr(e), trace=traceback.format_exc())
        sys.exit(1)
