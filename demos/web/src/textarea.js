// Two-way binding between a <textarea> and a Y.Text.
//
// Both count positions in UTF-16 code units (JavaScript string indices), so edits map one to one.
// A local edit becomes one delete + insert in a single transaction; a remote change is applied to
// the textarea from the Yjs delta, moving the user's selection with the text around it. Text that
// arrives exactly at the caret goes after it, as in demos/tk_notes.py, so two people typing at one
// spot each extend their own run instead of interleaving.

const isHigh = (code) => code >= 0xd800 && code <= 0xdbff
const isLow = (code) => code >= 0xdc00 && code <= 0xdfff

/** The single edit {index, remove, insert} turning `before` into `after`, never splitting a pair. */
export function diff (before, after) {
  const max = Math.min(before.length, after.length)
  let start = 0
  while (start < max && before.charCodeAt(start) === after.charCodeAt(start)) start++
  if (start > 0 && isHigh(before.charCodeAt(start - 1))) start--
  let end = 0
  while (
    end < max - start &&
    before.charCodeAt(before.length - 1 - end) === after.charCodeAt(after.length - 1 - end)
  ) end++
  if (end > 0 && isLow(before.charCodeAt(before.length - end))) end--
  return {
    index: start,
    remove: before.length - start - end,
    insert: after.slice(start, after.length - end)
  }
}

/** Where position `pos` goes after a Yjs text delta; inserts at `pos` stay after it. */
function moveThrough (delta, pos) {
  let old = 0 // position in the text before the delta
  let moved = pos
  for (const op of delta) {
    if (old >= pos) break // nothing at or after the caret moves it
    if (op.retain !== undefined) {
      old += op.retain
    } else if (op.insert !== undefined) {
      moved += typeof op.insert === 'string' ? op.insert.length : 1
    } else if (op.delete !== undefined) {
      moved -= Math.min(op.delete, pos - old)
      old += op.delete
    }
  }
  return moved
}

/**
 * Keep `textarea` and `ytext` equal. `onChange()` runs after every applied change (both ways).
 * Returns a function that undoes the binding.
 */
export function bindTextarea (ytext, textarea, { onChange = () => {} } = {}) {
  const origin = { binding: 'textarea' } // marks our own transactions, to skip their echo
  let shown = ytext.toString() // what the textarea shows, as last agreed with ytext
  textarea.value = shown

  const onInput = (event) => {
    if (event.isComposing) return // an IME is composing: wait for the final text
    const now = textarea.value
    if (now === shown) return
    const { index, remove, insert } = diff(shown, now)
    ytext.doc.transact(() => {
      if (remove > 0) ytext.delete(index, remove)
      if (insert) ytext.insert(index, insert)
    }, origin)
    shown = now
    onChange()
  }

  const onRemote = (event, transaction) => {
    if (transaction.origin === origin) return
    const { selectionStart, selectionEnd, selectionDirection } = textarea
    const start = moveThrough(event.delta, selectionStart)
    const end = moveThrough(event.delta, selectionEnd)
    shown = ytext.toString()
    textarea.value = shown
    if (document.activeElement === textarea) {
      textarea.setSelectionRange(start, end, selectionDirection)
    }
    onChange()
  }

  textarea.addEventListener('input', onInput)
  textarea.addEventListener('compositionend', onInput)
  ytext.observe(onRemote)
  return () => {
    textarea.removeEventListener('input', onInput)
    textarea.removeEventListener('compositionend', onInput)
    ytext.unobserve(onRemote)
  }
}
