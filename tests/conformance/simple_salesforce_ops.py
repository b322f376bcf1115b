"""Exercises the emulator with simple-salesforce (PyPI), unmodified, over TLS.

It also runs relationship queries, a subquery, an aggregate, Bulk API 2.0's refusal of GROUP BY
and all-or-none rollbacks. Each step checks the answer against what Salesforce documents and prints one JSON line on
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

    current = "soql-relations"
    # Relationship fields, a subquery and an aggregate, checked against the shapes the REST
    # API documents: nested parent records (null for an empty reference), nested query
    # results (null without children), AggregateResult rows with exprN names.
    parent = sf.Account.create({"Name": "Python parent", "Industry": "Energy"})["id"]
    for last in ("Py A", "Py B"):
        sf.Contact.create({"LastName": last, "AccountId": parent})
    sf.Contact.create({"LastName": "Py Orphan"})
    rel = sf.query(
        "SELECT Id, LastName, Account.Name FROM Contact WHERE LastName LIKE 'Py %' "
        "ORDER BY LastName"
    )
    check(rel["totalSize"] == 3, rel)
    first = rel["records"][0]
    check(list(first.keys()) == ["attributes", "Id", "LastName", "Account"], list(first))
    check(
        first["Account"]
        == {
            "attributes": {
                "type": "Account",
                "url": f"/services/data/v{version}/sobjects/Account/{parent}",
            },
            "Name": "Python parent",
        },
        first,
    )
    check(rel["records"][2]["Account"] is None, rel["records"][2])
    sub = sf.query(
        "SELECT Name, (SELECT LastName FROM Contacts ORDER BY LastName) FROM Account "
        f"WHERE Id = '{parent}'"
    )
    contacts = sub["records"][0]["Contacts"]
    check(contacts["totalSize"] == 2 and contacts["done"] is True, contacts)
    check([c["LastName"] for c in contacts["records"]] == ["Py A", "Py B"], contacts)
    check(contacts["records"][0]["attributes"]["type"] == "Contact", contacts)
    childless = sf.query(
        "SELECT Name, (SELECT Id FROM Contacts) FROM Account WHERE Id = '%s'" % account_id
    )
    check(childless["records"][0]["Contacts"] is None, childless)
    agg = sf.query(
        "SELECT Account.Name, COUNT(Id) total, MIN(LastName) FROM Contact "
        "WHERE LastName LIKE 'Py %' GROUP BY Account.Name ORDER BY Account.Name NULLS LAST"
    )
    check(
        agg["records"]
        == [
            {"attributes": {"type": "AggregateResult"}, "Name": "Python parent", "total": 2,
             "expr0": "Py A"},
            {"attributes": {"type": "AggregateResult"}, "Name": None, "total": 1,
             "expr0": "Py Orphan"},
        ],
        agg,
    )
    count = sf.query("SELECT COUNT() FROM Contact WHERE Account.Industry = 'Energy'")
    check(count["totalSize"] == 2 and count["records"] == [], count)
    try:
        list(sf.bulk2.Account.query("SELECT Name, COUNT(Id) FROM Account GROUP BY Name"))
        raise AssertionError("Bulk API 2.0 ran a GROUP BY")
    except SalesforceMalformedRequest as e:
        check(e.content[0]["errorCode"] == "FUNCTIONALITY_NOT_ENABLED", e.content)
    emit("soql-relations", parent=parent, groups=len(agg["records"]))

    current = "all-or-none"
    # A later failure rolls back what came before it in the same request.
    res = sf.restful(
        "composite/sobjects",
        method="POST",
        data=json.dumps(
            {
                "allOrNone": True,
                "records": [
                    {"attributes": {"type": "Account"}, "Name": "Python rolled back"},
                    {"attributes": {"type": "Account"}, "Nope__c": 1},
                ],
            }
        ),
    )
    check(res[0]["success"] is False, res)
    check(res[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK", res)
    check(res[1]["errors"][0]["statusCode"] == "INVALID_FIELD", res)
    comp = sf.restful(
        "composite",
        method="POST",
        data=json.dumps(
            {
                "allOrNone": True,
                "compositeRequest": [
                    {"method": "POST", "url": f"/services/data/v{version}/sobjects/Account",
                     "referenceId": "acct", "body": {"Name": "Python composite"}},
                    {"method": "POST", "url": f"/services/data/v{version}/sobjects/Contact",
                     "referenceId": "ct", "body": {"AccountId": "@{acct.id}"}},
                ],
            }
        ),
    )
    r = comp["compositeResponse"]
    check(r[0]["body"][0]["errorCode"] == "PROCESSING_HALTED", r)
    check(r[1]["body"][0]["errorCode"] == "REQUIRED_FIELD_MISSING", r)
    left = sf.query(
        "SELECT COUNT() FROM Account WHERE Name IN ('Python rolled back', 'Python composite')"
    )
    check(left["totalSize"] == 0, left)
    emit("all-or-none", collection=res, composite=r)

    emit("done")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        emit("failed", at=current, error=repr(e), trace=traceback.format_exc())
        sys.exit(1)
