// A certified OpenID provider for the tests: the npm package oidc-provider (its module path in
// OIDC_PROVIDER_MODULE), on 127.0.0.1:PORT, with one static confidential client (bastion),
// PKCE required (CLIENT_METADATA, a JSON object, overrides its metadata: another
// token_endpoint_auth_method, the public keys of private_key_jwt), and the people of USERS_FILE, a JSON object read at each login:
// { "<login>": { "password": "...", "groups": [...], "email": "..." } }. A login that is not
// there, or a wrong password, is refused at the provider. Prints "ready <issuer>" once listening.
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

const { default: Provider } = await import(
  pathToFileURL(process.env.OIDC_PROVIDER_MODULE).href
);

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;
const people = () => JSON.parse(readFileSync(process.env.USERS_FILE, 'utf8'));

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
  claims: { openid: ['sub'], email: ['email'], groups: ['groups'] },
  async findAccount(ctx, id) {
    const person = people()[id];
    if (!person) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: person.email, groups: person.groups };
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

provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`ready ${issuer}\n`);
});
