// A running request's page follows its answer: it asks for the chunks after the last one it
// has once a second (a short request each, so Passenger holds no process for the page), and
// reloads for the final figures once the request has ended.
const answer = document.getElementById("live-answer");
if (answer) {
  let next = Number(answer.dataset.next);
  const follow = async () => {
    try {
      const response = await fetch(`${answer.dataset.progress}?after=${next}`, {credentials: "same-origin"});
      if (response.ok) {
        const progress = await response.json();
        answer.textContent += progress.content;
        next = progress.next_seq;
        document.getElementById("status").textContent = progress.state;
        if (progress.ended) {
          window.location.reload();
          return;
        }
      }
    } catch (err) {
      // The gateway or the network is away for a moment: try again on the next tick.
    }
    setTimeout(follow, 1000);
  };
  setTimeout(follow, 1000);
}
