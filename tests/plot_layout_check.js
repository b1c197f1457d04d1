// What a reader sees wrong in a drawn plotly figure, read from the page (tests/test_browser.py).
// Called with the figure's element (.js-plotly-plot); returns a list of problems, [] when it reads well:
//   - the legend scrolls (entries hidden), or covers the plot area or the title;
//   - the plot area is squeezed (narrower than 45 % of the figure, or than 240 px);
//   - a note (annotation) is printed over an axis title or tick labels;
//   - tick labels overlap each other (x axis, colour bar);
//   - a log axis labels a tick with a number other than its value (plotly writes 0.5 as "5").
(gd) => {
    const problems = [];
    if (!gd || !gd._fullLayout) {
        return ["not a drawn plotly figure"];
    }
    const box = (el) => el.getBoundingClientRect();
    const area = (r) => Math.max(0, r.width) * Math.max(0, r.height);
    const overlap = (a, b) => {
        const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
        const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
        return w > 1 && h > 1 ? w * h : 0;
    };
    const visible = (el) => {
        const r = box(el);
        return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden"
            && getComputedStyle(el).display !== "none" && el.getAttribute("opacity") !== "0";
    };
    const name = gd._fullLayout.title && gd._fullLayout.title.text
        ? gd._fullLayout.title.text.split("<br>")[0].replace(/<[^>]+>/g, "") : "(untitled figure)";
    const say = (text) => problems.push(`${name}: ${text}`);

    // The figure as plotly drew it: a FigureWidget's element can be wider than its fixed-size SVG.
    const svg = gd.querySelector(".main-svg");
    const figure = svg ? box(svg) : box(gd);
    const plotAreas = [...gd.querySelectorAll(".draglayer .nsewdrag")].filter(visible).map(box);
    const legend = gd.querySelector(".legend");
    if (legend && visible(legend)) {
        const bar = legend.querySelector(".scrollbar");
        if (bar && visible(bar) && box(bar).height > 1) {
            say("the legend scrolls: some entries are hidden");
        }
        const lb = legend.querySelector(".bg") || legend;
        for (const plot of plotAreas) {
            if (overlap(box(lb), plot) > 0.02 * area(plot)) {
                say("the legend covers the plot area");
                break;
            }
        }
        const title = gd.querySelector(".g-gtitle text");
        if (title && visible(title) && overlap(box(lb), box(title)) > 0) {
            say("the legend covers the title");
        }
    }
    if (plotAreas.length) {
        const left = Math.min(...plotAreas.map((r) => r.left));
        const right = Math.max(...plotAreas.map((r) => r.right));
        const width = right - left;
        if (width < 240 || width < 0.45 * figure.width) {
            say(`the plot area is ${Math.round(width)} px wide in a ${Math.round(figure.width)} px figure`);
        }
    }
    const labels = [...gd.querySelectorAll(".g-xtitle text, .g-ytitle text, .xtick text, .ytick text")]
        .filter(visible);
    for (const note of [...gd.querySelectorAll(".annotation")].filter(visible)) {
        const nb = box(note.querySelector(".annotation-text-g") || note);
        const hit = labels.find((l) => overlap(nb, box(l)) > 0);
        if (hit) {
            say(`the note "${note.textContent.slice(0, 60)}" is printed over "${hit.textContent.slice(0, 40)}"`);
        }
    }
    const crowded = (selector, what) => {
        const texts = [...gd.querySelectorAll(selector)].filter(visible).map(box);
        for (let i = 0; i < texts.length; i++) {
            for (let j = i + 1; j < texts.length; j++) {
                if (overlap(texts[i], texts[j]) > 0) {
                    say(`${what} overlap`);
                    return;
                }
            }
        }
    };
    for (const axis of gd.querySelectorAll(".xaxislayer-above")) {
        crowded(`.${[...axis.classList].join(".")} .xtick text`, "x tick labels");
    }
    crowded(".colorbar .cbaxis text, .colorbar .ytick text", "colour bar labels");
    for (const [key, axis] of Object.entries(gd._fullLayout)) {
        if (!/^[xy]axis\d*$/.test(key) || !axis || axis.type !== "log" || !axis._vals) {
            continue;
        }
        for (const tick of axis._vals) {
            const text = String(tick.text || "").replace(/<[^>]+>/g, "").replace("\u2212", "-").trim();
            const value = Math.pow(10, tick.x);
            const multiplier = /k$/.test(text) ? 1e3 : /M$/.test(text) ? 1e6 : 1;
            const written = parseFloat(text) * multiplier;
            if (text && !Number.isNaN(written) && Math.abs(written - value) > 0.01 * value) {
                say(`${key} (log) labels ${value.toPrecision(3)} as "${text}"`);
                break;
            }
        }
    }
    return problems;
}
