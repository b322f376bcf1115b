// Makes this Node process trust the emulator's private CA on every TLS connection, including
// connections whose client pins its own list of roots.
//
// Why: salesforce-pubsub-api-client passes its bundled certifi roots to
// grpc.credentials.createSsl(), so neither GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (only read when no
// roots are given) nor NODE_EXTRA_CA_CERTS (ignored when `ca` is explicit) reaches it, and the
// client has no option to add a CA. The only switch it offers is rejectUnauthorizedSsl=false,
// which would turn certificate checks off. Instead, we add the emulator's CA next to whatever
// roots a client asks for, so certificates and host names are still verified.
//
// The client library itself is untouched: this is the moral equivalent of installing the CA
// into the machine's trust store for the lifetime of this test process.

import fs from 'node:fs';
import tls from 'node:tls';

export function trustExtraCa(caFile) {
    if (!caFile) {
        return;
    }
    const extra = fs.readFileSync(caFile, 'utf8');
    const original = tls.createSecureContext;
    tls.createSecureContext = function createSecureContextWithEmulatorCa(options = {}) {
        if (options.ca === undefined || options.ca === null) {
            // The default roots; NODE_EXTRA_CA_CERTS covers these.
            return original.call(this, options);
        }
        const pinned = Array.isArray(options.ca) ? options.ca : [options.ca];
        return original.call(this, { ...options, ca: [...pinned, extra] });
    };
}
