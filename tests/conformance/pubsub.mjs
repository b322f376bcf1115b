// Subscribes to change event topics and publishes/receives a platform event with the real
// salesforce-pubsub-api-client, in user-supplied token mode over TLS, and reports what the
// client decoded as JSON lines on stdout (one object a line, `kind` says what it is).
//
// Environment (set by tests/conformance.rs):
//   SFM_INSTANCE_URL     https://127.0.0.1:PORT (the REST side of the emulator)
//   SFM_ACCESS_TOKEN     an access token the emulator accepts
//   SFM_ORG_ID           the org id (tenant id)
//   SFM_PUBSUB_ENDPOINT  host:port of the Pub/Sub API
//   SFM_CA_FILE          PEM of the CA that signed the emulator's certificates
//   SFM_CDC_TOPICS       comma-separated change event topics to subscribe to at LATEST
//   SFM_EVENT_TOPIC      platform event topic: subscribed from EARLIEST, then one published
//
// Lines written:
//   {"kind":"subscribed","topics":[...]}            subscribe requests sent
//   {"kind":"published","topic","replayId","correlationKey"}
//   {"kind":"event","topic","replayId","id","schemaId","payload"}   one per decoded event
//   {"kind":"error","topic","message","code"}       any error the client reported
// The process runs until its stdin closes, then closes the client and exits 0.

import PubSubApiClient from 'salesforce-pubsub-api-client';
import { trustExtraCa } from './trust.mjs';

function env(name) {
    const value = process.env[name];
    if (!value) {
        throw new Error(`environment variable ${name} is required`);
    }
    return value;
}

function emit(line) {
    process.stdout.write(
        JSON.stringify(line, (_key, value) => (typeof value === 'bigint' ? value.toString() : value)) + '\n'
    );
}

// The client logs through the logger it is given (the console by default, i.e. stdout, which
// carries our protocol): send its logs to stderr, where the Rust test shows them on failure.
const stderrLogger = {
    debug: (...args) => (process.env.SFM_DEBUG ? console.error('[debug]', ...args) : undefined),
    info: (...args) => console.error('[info]', ...args),
    warn: (...args) => console.error('[warn]', ...args),
    error: (...args) => console.error('[error]', ...args)
};

function describeError(error) {
    if (!error) {
        return 'unknown error';
    }
    let message = error.message ?? String(error);
    let cause = error.cause;
    while (cause) {
        message += ` <- ${cause.message ?? String(cause)}`;
        cause = cause.cause;
    }
    return message;
}

async function main() {
    trustExtraCa(process.env.SFM_CA_FILE);

    const client = new PubSubApiClient(
        {
            authType: 'user-supplied',
            accessToken: env('SFM_ACCESS_TOKEN'),
            instanceUrl: env('SFM_INSTANCE_URL'),
            organizationId: env('SFM_ORG_ID'),
            pubSubEndpoint: env('SFM_PUBSUB_ENDPOINT')
        },
        stderrLogger
    );
    await client.connect();

    const callback = (subscription, callbackType, data) => {
        const topic = subscription?.topicName;
        switch (callbackType) {
            case 'event':
                emit({
                    kind: 'event',
                    topic,
                    replayId: data.replayId,
                    id: data.id,
                    schemaId: data.schemaId,
                    payload: data.payload
                });
                break;
            case 'error':
                emit({
                    kind: 'error',
                    topic,
                    message: describeError(data),
                    code: data?.code ?? null,
                    details: data?.details ?? null
                });
                break;
            case 'lastEvent':
            case 'end':
                emit({ kind: callbackType, topic });
                break;
            default:
                // grpcStatus and keepalives: informative only.
                stderrLogger.info(`${topic}: ${callbackType}`);
        }
    };

    const cdcTopics = (process.env.SFM_CDC_TOPICS ?? '')
        .split(',')
        .map((t) => t.trim())
        .filter((t) => t.length > 0);
    for (const topic of cdcTopics) {
        // No count: the client keeps asking for more, batch after batch.
        client.subscribe(topic, callback);
    }
    emit({ kind: 'subscribed', topics: cdcTopics });

    const eventTopic = process.env.SFM_EVENT_TOPIC;
    if (eventTopic) {
        // From EARLIEST, one event: the one published below, whenever the subscription starts.
        client.subscribeFromEarliestEvent(eventTopic, callback, 1);
        const shippedAt = Date.UTC(2024, 4, 17, 9, 30, 15, 250);
        const payload = {
            // Required by every platform event schema; the server sets its own.
            CreatedDate: Date.now(),
            CreatedById: '005000000000000AAA',
            // Nullable fields are Avro unions: the client wants the branch named.
            Order_Number__c: { string: 'ORD-0042' },
            Shipped_At__c: { long: shippedAt },
            Weight_Kg__c: { double: 12.75 },
            Express__c: { boolean: true }
        };
        try {
            const result = await client.publish(eventTopic, payload, 'conformance-correlation-1');
            emit({
                kind: 'published',
                topic: eventTopic,
                replayId: result.replayId,
                correlationKey: result.correlationKey,
                error: result.error ?? null,
                sent: { ...payload, CreatedDate: undefined }
            });
        } catch (error) {
            emit({ kind: 'error', topic: eventTopic, message: describeError(error), code: error?.cause?.code ?? null });
        }
    }

    // Run until the test closes stdin.
    process.stdin.resume();
    process.stdin.on('end', () => {
        client.close();
        process.exit(0);
    });
}

main().catch((error) => {
    emit({ kind: 'fatal', message: describeError(error) });
    console.error(error);
    process.exit(1);
});
