// Exercises the REST side with the real jsforce client: describe, record CRUD, SOQL query
// with paging (queryMore and autoFetch), queryAll, sObject Collections retrieve, a Bulk
// API 2.0 query, upsert by external id, relationship queries, subqueries and aggregates (and
// what Bulk API 2.0 refuses of them), an all-or-none rollback, a connection kept alive across
// an error answer, and the SOAP login() that jsforce's default login uses. Each step prints one JSON line on stdout, `{"step": ..., ...}`; the Rust test
// checks them against the org. Any failure prints `{"step": "failed", ...}` and exits 1.
//
// Environment (set by tests/conformance.rs):
//   SFM_INSTANCE_URL  https://127.0.0.1:PORT
//   SFM_ACCESS_TOKEN  an access token the emulator accepts
//   SFM_API_VERSION   e.g. 62.0
//   SFM_USERNAME, SFM_PASSWORD  the emulator's user, for jsforce's SOAP login()
// The emulator's CA comes in through NODE_EXTRA_CA_CERTS (jsforce uses Node's default roots).

import jsforce from 'jsforce';

function env(name) {
    const value = process.env[name];
    if (!value) {
        throw new Error(`environment variable ${name} is required`);
    }
    return value;
}

function emit(line) {
    process.stdout.write(JSON.stringify(line) + '\n');
}

function ids(records) {
    return records.map((r) => r.Id).sort();
}

let current = 'connect';

async function main() {
    const conn = new jsforce.Connection({
        instanceUrl: env('SFM_INSTANCE_URL'),
        accessToken: env('SFM_ACCESS_TOKEN'),
        version: env('SFM_API_VERSION')
    });

    current = 'describe';
    const describe = await conn.sobject('Account').describe();
    const billingCity = describe.fields.find((f) => f.name === 'BillingCity');
    emit({
        step: 'describe',
        name: describe.name,
        keyPrefix: describe.keyPrefix,
        fields: describe.fields.map((f) => f.name),
        billingCity: billingCity
            ? { type: billingCity.type, compoundFieldName: billingCity.compoundFieldName }
            : null
    });

    current = 'create';
    const created = await conn.sobject('Account').create({
        Name: 'jsforce conformance',
        Phone: '555-0100',
        BillingCity: 'Lyon',
        NumberOfEmployees: 42,
        AnnualRevenue: 1250000.5
    });
    emit({ step: 'create', result: created });
    const id = created.id;

    current = 'retrieve';
    emit({ step: 'retrieve', record: await conn.sobject('Account').retrieve(id) });

    current = 'update';
    const updated = await conn.sobject('Account').update({
        Id: id,
        Phone: '555-0199',
        BillingCity: 'Nice',
        NumberOfEmployees: null
    });
    emit({ step: 'update', result: updated });

    current = 'retrieve-updated';
    emit({ step: 'retrieve-updated', record: await conn.sobject('Account').retrieve(id) });

    current = 'retrieve-many';
    // An array of ids goes through sObject Collections (POST composite/sobjects/Account) with
    // every field of the describe.
    const many = await conn.sobject('Account').retrieve([id]);
    emit({ step: 'retrieve-many', records: many });

    current = 'query-page';
    // One page at a time: the first page, then queryMore with its nextRecordsUrl.
    const soql = 'SELECT Id, Name FROM Account ORDER BY Id';
    const first = await conn.query(soql, { autoFetch: false });
    const pages = [{ size: first.records.length, done: first.done, totalSize: first.totalSize }];
    let pagedIds = ids(first.records);
    let next = first.nextRecordsUrl;
    while (next) {
        const page = await conn.queryMore(next);
        pages.push({ size: page.records.length, done: page.done, totalSize: page.totalSize });
        pagedIds = pagedIds.concat(ids(page.records));
        next = page.nextRecordsUrl;
    }
    emit({ step: 'query-page', firstNextRecordsUrl: first.nextRecordsUrl ?? null, pages, ids: pagedIds.sort() });

    current = 'query-autofetch';
    const all = await conn.query('SELECT Id, Name FROM Account').run({ autoFetch: true, maxFetch: 100000 });
    emit({ step: 'query-autofetch', totalSize: all.totalSize, done: all.done, ids: ids(all.records) });

    current = 'delete';
    emit({ step: 'delete', result: await conn.sobject('Account').destroy(id) });

    current = 'query-deleted';
    const byId = `SELECT Id, Name, IsDeleted FROM Account WHERE Id = '${id}'`;
    const live = await conn.query(byId);
    const withDeleted = await conn.query(byId, { scanAll: true });
    emit({ step: 'query-deleted', query: live.records, queryAll: withDeleted.records });

    current = 'bulk2-query';
    conn.bulk2.pollInterval = 200;
    conn.bulk2.pollTimeout = 60000;
    const bulkRecords = await (await conn.bulk2.query('SELECT Id, Name, BillingCity FROM Account')).toArray();
    emit({ step: 'bulk2-query', count: bulkRecords.length, ids: ids(bulkRecords), sample: bulkRecords.slice(0, 3) });

    current = 'bulk2-queryAll';
    const bulkAll = await (
        await conn.bulk2.query(`SELECT Id, IsDeleted FROM Account WHERE Id = '${id}'`, { scanAll: true })
    ).toArray();
    emit({ step: 'bulk2-queryAll', records: bulkAll });

    current = 'errors';
    // Bad queries must come back as Salesforce errors that jsforce can read.
    const errors = [];
    for (const bad of ['SELECT Id FROM Account WHERE Name =', 'SELECT No_Such_Field__c FROM Account']) {
        try {
            await conn.query(bad);
            errors.push({ soql: bad, errorCode: null, message: 'no error' });
        } catch (error) {
            errors.push({ soql: bad, errorCode: error.errorCode ?? null, name: error.name, message: error.message });
        }
    }
    emit({ step: 'errors', errors });

    current = 'keep-alive';
    // An error answer must leave the connection usable: the next call on it succeeds.
    let missing = null;
    try {
        await conn.sobject('Account').retrieve('001000000000000AAA');
    } catch (error) {
        missing = error.errorCode ?? error.name;
    }
    const after = await conn.query('SELECT COUNT() FROM Account');
    emit({ step: 'keep-alive', missing, totalSize: after.totalSize });

    current = 'upsert';
    const upserted = await conn
        .sobject('Invoice__c')
        .upsert({ Name: 'jsforce upsert', External_Id__c: 'JS-1' }, 'External_Id__c');
    const upsertedAgain = await conn
        .sobject('Invoice__c')
        .upsert({ Name: 'jsforce upsert again', External_Id__c: 'JS-1' }, 'External_Id__c');
    emit({ step: 'upsert', first: upserted, second: upsertedAgain });

    current = 'soql-relations';
    // Relationship fields, a parent-to-child subquery and an aggregate, read through jsforce's
    // own result handling.
    const parent = await conn.sobject('Account').create({ Name: 'jsforce parent', Industry: 'Energy' });
    const kids = await conn.sobject('Contact').create([
        { LastName: 'Rel A', AccountId: parent.id },
        { LastName: 'Rel B', AccountId: parent.id },
        { LastName: 'Rel Orphan' }
    ], { allOrNone: true });
    const related = await conn.query(
        "SELECT Id, LastName, Account.Name, Account.Industry FROM Contact WHERE LastName LIKE 'Rel%' ORDER BY LastName"
    );
    const nested = await conn.query(
        `SELECT Id, Name, (SELECT LastName FROM Contacts ORDER BY LastName DESC) FROM Account WHERE Id = '${parent.id}'`
    );
    const grouped = await conn.query(
        "SELECT Account.Name acct, COUNT(Id) n, MAX(LastName) FROM Contact WHERE LastName LIKE 'Rel%' GROUP BY Account.Name ORDER BY Account.Name"
    );
    const bulkRelated = await (
        await conn.bulk2.query("SELECT Id, Account.Name FROM Contact WHERE LastName LIKE 'Rel%'")
    ).toArray();
    let bulkRefused = null;
    try {
        await (await conn.bulk2.query('SELECT Name, COUNT(Id) FROM Account GROUP BY Name')).toArray();
    } catch (error) {
        bulkRefused = { name: error.name, errorCode: error.errorCode ?? null, message: error.message };
    }
    // All or none: the first update is rolled back when the second fails.
    const rollback = await conn.sobject('Account').update(
        [{ Id: parent.id, Phone: '555-0111' }, { Id: '001000000000000AAA', Phone: '555-0112' }],
        { allOrNone: true }
    );
    emit({
        step: 'soql-relations',
        parent: parent.id,
        kids: kids.map((k) => k.id),
        related: related.records,
        nested: nested.records,
        grouped: grouped.records,
        bulkRelated,
        bulkRefused,
        rollback
    });

    current = 'collections';
    // Arrays go through sObject Collections (composite/sobjects).
    const many2 = await conn.sobject('Account').create(
        [{ Name: 'jsforce collection 1' }, { Name: 'jsforce collection 2' }],
        { allOrNone: true }
    );
    const rolledBack = await conn.sobject('Account').create(
        [{ Name: 'jsforce collection 3' }, { No_Such_Field__c: 1 }],
        { allOrNone: true }
    );
    const destroyed = await conn.sobject('Account').destroy(many2.map((r) => r.id));
    emit({ step: 'collections', created: many2, rolledBack, destroyed });

    current = 'updated-deleted';
    // getUpdated / getDeleted over the last hour up to the next one (the window's end is cut to
    // the minute and never after now).
    const since = new Date(Date.now() - 3600 * 1000);
    const until = new Date(Date.now() + 3600 * 1000);
    const upd = await conn.sobject('Account').updated(since, until);
    const del = await conn.sobject('Account').deleted(since, until);
    emit({
        step: 'updated-deleted',
        updated: upd.ids.length,
        latestDateCovered: upd.latestDateCovered,
        deleted: del.deletedRecords.map((r) => r.id).sort()
    });

    current = 'soap-login';
    // jsforce's default login(): the SOAP partner API's login() call.
    const soap = new jsforce.Connection({ loginUrl: env('SFM_INSTANCE_URL'), version: env('SFM_API_VERSION') });
    const userInfo = await soap.login(env('SFM_USERNAME'), env('SFM_PASSWORD'));
    const viaSoap = await soap.query('SELECT COUNT() FROM Account');
    let refused = null;
    try {
        await new jsforce.Connection({ loginUrl: env('SFM_INSTANCE_URL'), version: env('SFM_API_VERSION') })
            .login(env('SFM_USERNAME'), 'wrong password');
    } catch (error) {
        refused = error.message;
    }
    let retired = null;
    try {
        await new jsforce.Connection({ loginUrl: env('SFM_INSTANCE_URL'), version: '65.0' })
            .login(env('SFM_USERNAME'), env('SFM_PASSWORD'));
    } catch (error) {
        retired = error.message;
    }
    emit({
        step: 'soap-login',
        organizationId: userInfo.organizationId,
        userId: userInfo.id,
        instanceUrl: soap.instanceUrl,
        totalSize: viaSoap.totalSize,
        refused,
        retired
    });

    emit({ step: 'done' });
}

main().catch((error) => {
    emit({ step: 'failed', during: current, name: error?.name, errorCode: error?.errorCode ?? null, message: error?.message ?? String(error) });
    console.error(error);
    process.exit(1);
});
