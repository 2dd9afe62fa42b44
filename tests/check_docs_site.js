// Measures a page of the site for tests/check_docs_site.py, which injects it
// into the page after `const DOCS_CHECK = {tolerance, minScale, resultId};`.
// Once the page has loaded, it writes what it found into the page as JSON, for
// the browser's `--dump-dom` to return.

function measureDocsPage({ tolerance, minScale, resultId }) {
  const clip = (text, size = 80) => {
    text = text.replace(/\s+/g, " ").trim();
    return text.length > size ? text.slice(0, size - 1) + "\u2026" : text;
  };
  const lines = (el) => el.textContent.split("\n").filter((line) => line.trim());
  // What a report says of a box: a table by its header cells, code by its
  // first line and its longest (the one to shorten).
  const describe = (el) => {
    const table = el.matches("table") ? el : el.querySelector("table");
    if (table) {
      const cells = [...table.querySelectorAll("th")];
      const header = cells.map((th) => clip(th.textContent, 30)).join(" | ");
      return { kind: "table", excerpt: clip(header, 120) };
    }
    const code = el.closest("pre") || el.querySelector("pre") || el.closest("code");
    if (code) {
      const all = lines(code);
      const longest = all.reduce((a, b) => (b.length > a.length ? b : a), "");
      return {
        kind: "code",
        excerpt: clip(all[0] || ""),
        longest: clip(longest.trim()),
        longest_chars: longest.length,
      };
    }
    const classes = [...el.classList].map((name) => "." + name).join("");
    const name = el.tagName.toLowerCase() + classes;
    return { kind: "other", excerpt: name + ": " + clip(el.textContent, 60) };
  };
  // The heading a box comes under, so that a report says where it is.
  const text = document.querySelector("article") || document.body;
  const headings = [...text.querySelectorAll("h1[id], h2[id], h3[id], h4[id]")];
  const sectionOf = (el) => {
    let id = "";
    for (const heading of headings) {
      if (!(heading.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING)) {
        break;
      }
      id = heading.id;
    }
    return id;
  };
  // Closed drawers and hidden tabs measure 0 wide: nothing to see there.
  const visible = (el) => el.clientWidth > 0 && el.getClientRects().length > 0;

  const overflows = [];
  const reported = [];
  const check = (el, over) => {
    if (over <= tolerance || !visible(el)) return;
    // A code block and the <code> inside it are one problem, not two.
    if (reported.some((r) => r.contains(el) || el.contains(r))) return;
    reported.push(el);
    overflows.push({ ...describe(el), section: sectionOf(el), px: Math.round(over) });
  };
  // Boxes that scroll sideways and are wider inside than out: the page fits,
  // but what is past the box's edge is hidden. Material's table wrapper
  // (div.md-typeset__scrollwrap) and code blocks, or anything with overflow-x.
  for (const el of document.body.querySelectorAll("*")) {
    const overflowX = getComputedStyle(el).overflowX;
    if (overflowX === "auto" || overflowX === "scroll") {
      check(el, el.scrollWidth - el.clientWidth);
    }
  }
  // Code that does not scroll but spills out of its block, or is cut off.
  for (const el of document.body.querySelectorAll("pre, pre > code")) {
    check(el, el.scrollWidth - el.clientWidth);
  }
  // A table outside any scrolling box, wider than the block that holds it.
  for (const table of document.body.querySelectorAll("table")) {
    check(table, table.offsetWidth - table.parentElement.clientWidth);
  }

  // The page itself: the window scrolls sideways. Named by the innermost
  // boxes that reach past the window's right edge, leaving out those that a
  // box of theirs cuts off or scrolls (a wide table's cells).
  const root = document.documentElement;
  const pageOver = root.scrollWidth - root.clientWidth;
  const culprits = [];
  if (pageOver > tolerance) {
    const clipped = (el) => {
      for (let box = el.parentElement; box !== document.body; box = box.parentElement) {
        if (getComputedStyle(box).overflowX !== "visible") return true;
      }
      return false;
    };
    const past = (el) =>
      el.getBoundingClientRect().right > root.clientWidth + tolerance && !clipped(el);
    for (const el of document.body.querySelectorAll("*")) {
      if (culprits.length < 5 && past(el) && ![...el.children].some(past)) {
        culprits.push(describe(el).excerpt);
      }
    }
  }

  const images = [...document.images].map((img) => {
    const shown = img.getBoundingClientRect().width;
    return {
      src: img.getAttribute("src"),
      loaded: img.complete && img.naturalWidth > 0,
      natural: img.naturalWidth,
      shown: Math.round(shown),
      downscaled: shown > 0 && shown < minScale * img.naturalWidth,
    };
  });

  const result = {
    viewport: window.innerWidth,
    width: root.clientWidth,
    height: root.scrollHeight,
    page_over: pageOver > tolerance ? pageOver : 0,
    culprits,
    overflows,
    images,
  };
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = resultId;
  // "<" escaped: a closing script tag in an excerpt would end the element.
  out.textContent = JSON.stringify(result).replace(/</g, "\\u003c");
  document.body.appendChild(out);
}

// After the load event's own handlers (Material wraps tables from its script)
// and the fonts, which set the widths. The browser runs on virtual time: the
// 500 ms cost nothing.
window.addEventListener("load", () =>
  document.fonts.ready.then(() => setTimeout(() => measureDocsPage(DOCS_CHECK), 500))
);
