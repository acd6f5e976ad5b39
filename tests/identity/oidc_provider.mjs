// A certified OpenID provider for the tests: the npm package oidc-provider (its module path in
// OIDC_PROVIDER_MODULE), on 127.0.0.1:PORT, with one static confidential client (bastion),
// PKCE required (CLIENT_METADATA, a JSON object, overrides its metadata: another
// token_endpoint_auth_method, the public keys of private_key_jwt), and the people of USERS_FILE, a JSON object read at each login:
// { "<login>": { "password": "...", "groups": [...], "email": "..." } }. A login that is not
// there, or a wrong password, is refused at the provider. Prints "ready <issuer>" once listening.
//
// With TENANTS (tenant ids, space-separated) it is a multi-tenant provider as Entra ID is: one
// oidc-provider per tenant, each its own issuer <base>/<tenant>/v2.0 (its ID tokens' iss, and a
// tid claim), served at that path; and <base>/organizations/v2.0, Entra's alias for them all,
// whose discovery document's issuer is the template <base>/{tenantid}/v2.0 and whose every path
// is answered by the tenant TENANT_FILE names at that moment (the person's home tenant, which
// Entra finds from their login). Prints "ready <base>/organizations/v2.0".
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { pathToFileURL } from 'node:url';

const { default: Provider } = await import(
  pathToFileURL(process.env.OIDC_PROVIDER_MODULE).href
);

const port = Number(process.env.PORT);
const base = `http://127.0.0.1:${port}`;
const people = () => JSON.parse(readFileSync(process.env.USERS_FILE, 'utf8'));
const ALIAS = '/organizations/v2.0';

function makeProvider(issuer, tenant) {
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: process.env.CLIENT_ID,
        client_secret: process.env.CLIENT_SECRET,
        redirect_uris: process.env.REDIRECT_URIS.split(' '),
        grant_types: ['authorization_code'],
        response_types: ['code'],
        token_endpoint_auth_method: 'client_secret_basic',
        ...JSON.parse(process.env.CLIENT_METADATA || '{}'),
      },
    ],
    jwks: JSON.parse(process.env.JWKS),
    cookies: { keys: ['oidc-provider test cookie key, not a secret'] },
    pkce: { required: () => true },
    scopes: ['openid', 'email', 'groups'],
    claims: { openid: tenant ? ['sub', 'tid'] : ['sub'], email: ['email'], groups: ['groups'] },
    async findAccount(ctx, id) {
      const person = people()[id];
      if (!person) return undefined;
      return {
        accountId: id,
        async claims() {
          const tid = tenant ? { tid: tenant } : {};
          return { sub: id, ...tid, email: person.email, groups: person.groups };
        },
      };
    },
    features: { devInteractions: { enabled: true } },
  });

  // The development login page takes any login: check the password here, before it does.
  provider.use(async (ctx, next) => {
    if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
      const body = await new Promise((resolve) => {
        let text = '';
        ctx.req.on('data', (chunk) => { text += chunk; });
        ctx.req.on('end', () => resolve(new URLSearchParams(text)));
      });
      if (body.get('prompt') === 'login') {
        const person = people()[body.get('login')];
        if (!person || person.password !== body.get('password')) {
          ctx.status = 401;
          ctx.type = 'html';
          ctx.body = '<!doctype html><title>Refused</title><h1>Wrong login or password</h1>';
          return;
        }
      }
      ctx.request.body = Object.fromEntries(body);
    }
    await next();
  });

  // Its development pages load a web font from Google: the tests' browser stays on this machine.
  provider.use(async (ctx, next) => {
    await next();
    if (typeof ctx.body === 'string' && ctx.body.includes('fonts.googleapis.com')) {
      ctx.body = ctx.body.replace(/@import url\(https:\/\/fonts\.googleapis\.com[^)]*\);/g, '');
    }
  });

  // Entra's alias publishes the template, not the tenant's issuer.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.req.originalUrl?.startsWith(`${ALIAS}/`) && ctx.path === '/.well-known/openid-configuration') {
      ctx.body = { ...ctx.body, issuer: `${base}/{tenantid}/v2.0` };
    }
  });
  return provider;
}

const tenants = (process.env.TENANTS || '').split(' ').filter(Boolean);
if (tenants.length === 0) {
  makeProvider(base, null).listen(port, '127.0.0.1', () => {
    process.stdout.write(`ready ${base}\n`);
  });
} else {
  const handlers = Object.fromEntries(
    tenants.map((t) => [t, makeProvider(`${base}/${t}/v2.0`, t).callback()]),
  );
  createServer((req, res) => {
    // oidc-provider finds the path it is mounted at from originalUrl less url (as Express's).
    const path = req.url.split('?')[0];
    let tenant;
    let mount;
    if (path.startsWith(`${ALIAS}/`)) {
      tenant = readFileSync(process.env.TENANT_FILE, 'utf8').trim();
      mount = ALIAS;
    } else {
      [, tenant] = path.split('/');
      mount = `/${tenant}/v2.0`;
    }
    const handler = handlers[tenant];
    if (!handler || !path.startsWith(`${mount}/`)) {
      res.writeHead(404).end();
      return;
    }
    req.originalUrl = req.url;
    req.url = req.url.slice(mount.length);
    handler(req, res);
  }).listen(port, '127.0.0.1', () => {
    process.stdout.write(`ready ${base}${ALIAS}\n`);
  });
}
