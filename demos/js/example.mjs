// A Yjs front end editing a unity_crdt node's document through its local y-websocket endpoint.
//
//   node example.mjs <serverUrl> <doc> [text-to-append]
//   UNITY_CRDT_YJS_URL=ws://127.0.0.1:PORT UNITY_CRDT_YJS_TOKEN=... node example.mjs - notes hi
//
// The token comes from the node (`endpoint.token`, or NodeConfig(yjs_token=...)). It is sent in
// an Authorization header here (Node.js can set headers); browsers use `params: { token }`.
// Press Ctrl-C to stop; remote changes are logged as they arrive.
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const [urlArg, docName = 'notes', append] = process.argv.slice(2)
const serverUrl = urlArg && urlArg !== '-' ? urlArg : process.env.UNITY_CRDT_YJS_URL
const token = process.env.UNITY_CRDT_YJS_TOKEN
if (!serverUrl || !token) {
  console.error('usage: UNITY_CRDT_YJS_TOKEN=... node example.mjs <ws://127.0.0.1:PORT> [doc] [text]')
  process.exit(2)
}

// Node.js has no global WebSocket in every version: hand y-websocket the `ws` class, with the
// token in a header so it never appears in a URL.
class AuthorizedWebSocket extends WebSocket {
  constructor (url, protocols) {
    super(url, protocols, { headers: { Authorization: `Bearer ${token}` } })
  }
}

const doc = new Y.Doc()
const text = doc.getText('text') // the node sees it as doc.get("text", type=pycrdt.Text)
const provider = new WebsocketProvider(serverUrl, encodeURIComponent(docName), doc, {
  WebSocketPolyfill: AuthorizedWebSocket,
  disableBc: true // no BroadcastChannel in Node.js; the node relays between front ends
})

provider.on('status', ({ status }) => console.log(`[${docName}] ${status}`))
provider.on('closed', ({ code, reason }) => {
  console.error(`[${docName}] closed for good (${code} ${reason}); check the token and doc name`)
  process.exit(1)
})
provider.awareness.setLocalState({ user: { name: `example-${process.pid}` } })
provider.awareness.on('change', () => {
  const others = [...provider.awareness.getStates()]
    .filter(([id]) => id !== doc.clientID)
    .map(([, state]) => state.user?.name ?? '?')
  console.log(`[${docName}] here now: ${others.join(', ') || 'nobody else'}`)
})

text.observe((event) => {
  if (event.transaction.local) return
  console.log(`[${docName}] remote change -> ${JSON.stringify(text.toString())}`)
})

provider.once('sync', () => {
  console.log(`[${docName}] synced: ${JSON.stringify(text.toString())}`)
  if (append) text.insert(text.length, append) // Yjs lengths and indices count UTF-16 units
})

process.on('SIGINT', () => {
  provider.destroy() // tells the others this client left
  setTimeout(() => process.exit(0), 50)
})
